"""Guided decoding (structured output) with xgrammar: see `decoder.py` for how it runs."""

from baton.engine.guided.decoder import GuidedDecoder

__all__ = ["GuidedDecoder"]
