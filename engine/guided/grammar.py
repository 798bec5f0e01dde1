"""From `GuidedDecodingParams` to grammar text xgrammar compiles, and the vocabulary it masks.

Every kind becomes EBNF text through xgrammar's own converters (JSON Schema, regex) or
directly (choice, EBNF), then passes two corrections for xgrammar 0.2.8 behaviour that
yields invalid text:

- strings bounded by minLength/maxLength accept raw control characters, which JSON forbids
  (mlc-ai/xgrammar#800): they get the character class of unbounded JSON strings;
- negated classes and `.` accept UTF-8 encodings of UTF-16 surrogates (bytes ED A0..BF ..),
  which are not characters: such bytes decode to U+FFFD and break lengths and patterns.
  A random model emits them often, a trained one rarely; they are excluded everywhere.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from baton.sampling_params import GuidedDecodingParams

# As xgrammar prints them in EBNF.
_BOUNDED_STRING_CHAR = r'[^\"\\\r\n]'
_JSON_STRING_CHAR = r'[^\0-\x1f\"\\\r\n]'
_ANY_CHAR = r"[\0-\U0010ffff]"  # regex "."
_SURROGATES = r"\uD800-\uDFFF"


def grammar_key(guided: GuidedDecodingParams) -> tuple[str, Any]:
    """(kind, source): a hashable cache key; ValueError if a JSON schema is not JSON."""
    kind = guided.kind
    if kind == "json":
        schema = guided.json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as exc:
                raise ValueError(f"guided_decoding.json is not valid JSON: {exc}") from None
        if not isinstance(schema, dict):
            raise ValueError("guided_decoding.json must be a JSON Schema object")
        return kind, json.dumps(schema)  # key order kept: the output follows property order
    if kind == "json_object":
        return kind, '{"type": "object"}'
    if kind == "choice":
        return kind, tuple(guided.choice)
    return kind, getattr(guided, kind)


def grammar_text(kind: str, source: Any) -> str:
    """The EBNF grammar (root rule `root`) for a `grammar_key`; xgrammar errors propagate."""
    import xgrammar as xgr

    if kind in ("json", "json_object"):
        # Compact separators (", " and ": "): with free whitespace a model can pad forever.
        text = str(xgr.Grammar.from_json_schema(source, any_whitespace=False))
        text = text.replace(_BOUNDED_STRING_CHAR, _JSON_STRING_CHAR)
    elif kind == "regex":
        text = str(xgr.Grammar.from_regex(source))
    elif kind == "choice":
        # JSON string escapes are EBNF string escapes.
        text = "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in source)
    else:
        text = str(xgr.Grammar.from_ebnf(source))
    return exclude_surrogates(text)


def exclude_surrogates(ebnf: str) -> str:
    """Make every negated class (and `.`) of xgrammar-printed EBNF skip UTF-16 surrogates."""
    out: list[str] = []
    i, n = 0, len(ebnf)
    while i < n:
        c = ebnf[i]
        if c in '"[':
            close = '"' if c == '"' else "]"
            j = i + 1
            while j < n and ebnf[j] != close:
                j += 2 if ebnf[j] == "\\" else 1
            token = ebnf[i : j + 1]
            if token == _ANY_CHAR:
                token = f"[^{_SURROGATES}]"
            elif token.startswith("[^"):
                token = token[:-1] + _SURROGATES + "]"
            out.append(token)
            i = j + 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def tokenizer_info(tokenizer_dir: Path, vocab_size: int, stop_token_ids: list[int]):
    """xgrammar's view of a `tokenizer.json` vocabulary, `vocab_size` (the logits) wide."""
    import xgrammar as xgr
    from tokenizers import Tokenizer as HFTokenizer

    tok = HFTokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
    encoded = [""] * max(tok.get_vocab_size(with_added_tokens=True), 1)
    for token, idx in tok.get_vocab(with_added_tokens=True).items():
        if idx < len(encoded):
            encoded[idx] = token
    # Special tokens are control, not text: an empty string makes xgrammar never allow them
    # inside the grammar (else "<|begin_of_text|>" would count as 17 characters of a string).
    for idx, added in tok.get_added_tokens_decoder().items():
        if added.special and idx < len(encoded):
            encoded[idx] = ""
    # xgrammar's own detection for Hugging Face fast tokenizers (byte-level, byte-fallback
    # or raw vocabulary; leading-space handling), from the serialized tokenizer.
    meta = xgr.TokenizerInfo._detect_metadata_from_hf(tok.to_str())
    return xgr.TokenizerInfo(
        encoded[:vocab_size],
        meta["vocab_type"],
        vocab_size=vocab_size,
        stop_token_ids=[t for t in stop_token_ids if t < vocab_size] or None,
        add_prefix_space=meta["add_prefix_space"],
    )
