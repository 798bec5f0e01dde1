"""Baton: LLM serving on Kubernetes with disaggregated prefill and decode.

This package holds what every component shares and what needs no torch: the CLI, settings,
sampling parameters, the tokenizer and chat template, and the gRPC protocol.
"""

__version__ = "0.1.0"
