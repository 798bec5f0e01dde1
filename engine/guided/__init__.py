"""Guided decoding (structured output) with xgrammar: see `decoder.py` for how it runs."""

from baton.engine.guided.decoder import MATCHER_KEY, GuidedDecoder

__all__ = ["MATCHER_KEY", "GuidedDecoder"]
