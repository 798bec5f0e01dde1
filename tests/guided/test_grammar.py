"""Grammar text and vocabulary for xgrammar: the corrections pinned at the matcher level."""

from __future__ import annotations

import pytest
import xgrammar as xgr

from baton.engine.guided.grammar import (
    exclude_surrogates,
    grammar_key,
    grammar_text,
    tokenizer_info,
)
from baton.sampling_params import GuidedDecodingParams

SURROGATE = b"\xed\xa2\x8f"  # UTF-8 bytes of U+D88F, which is not a character
HANGUL = "\ud55c".encode()  # U+D55C: ED 95 9C, a real character with the same lead byte


@pytest.fixture(scope="module")
def compiler(tiny_model):
    info = tokenizer_info(tiny_model, 512, [1, 3])
    return xgr.GrammarCompiler(info, cache_enabled=False)


def _accepts(compiler, kind, source, data: bytes) -> bool:
    matcher = xgr.GrammarMatcher(compiler.compile_grammar(grammar_text(kind, source)))
    return matcher.accept_string(data) and matcher.is_completed()


def test_bounded_json_strings_reject_raw_control_characters(compiler):
    schema = grammar_key(GuidedDecodingParams(json={"type": "string", "maxLength": 5}))[1]
    assert _accepts(compiler, "json", schema, b'"ab c"')
    for bad in (b'"a\tb"', b'"a\x17b"', b'"a\x00b"'):
        assert not _accepts(compiler, "json", schema, bad)


@pytest.mark.parametrize(
    "kind,source,make",
    [
        ("json", '{"type": "string", "maxLength": 5}', lambda ch: b'"' + ch + b'"'),
        ("json", '{"type": "string"}', lambda ch: b'"' + ch + b'"'),
        ("regex", "[^0-9]", lambda ch: ch),
        ("regex", ".", lambda ch: ch),
        ("grammar", "root ::= [^a]+", lambda ch: ch),
    ],
)
def test_surrogate_encodings_are_not_characters(compiler, kind, source, make):
    assert _accepts(compiler, kind, source, make(HANGUL))
    assert not _accepts(compiler, kind, source, make(SURROGATE))


def test_exclude_surrogates_leaves_strings_and_positive_classes_alone():
    ebnf = r'root ::= "[^x]" [a-z] [^\]b] "\"[^" [\0-\U0010ffff]'
    assert exclude_surrogates(ebnf) == (
        r'root ::= "[^x]" [a-z] [^\]b\uD800-\uDFFF] "\"[^" [^\uD800-\uDFFF]'
    )


def test_special_tokens_are_never_text(tiny_model, compiler):
    # "<|begin_of_text|>" (id 0) would otherwise be 17 characters of a string.
    matcher = xgr.GrammarMatcher(compiler.compile_grammar(grammar_text("regex", "[<|a-z_>]{0,40}")))
    bitmask = xgr.allocate_token_bitmask(1, 512)
    matcher.fill_next_token_bitmask(bitmask)
    allowed = {i for i in range(512) if (int(bitmask[0, i // 32]) >> (i % 32)) & 1}
    assert not allowed & {0, 2}  # begin_of_text, im_start
    assert allowed & {1, 3}  # the stop tokens end a complete string
    assert len(allowed) > 20


def test_padded_vocabulary_ids_are_never_allowed(tiny_model):
    info = tokenizer_info(tiny_model, 600, [1, 3])
    assert info.vocab_size == 600
    assert set(range(512, 600)) <= set(info.special_token_ids)


def test_grammar_keys():
    as_dict = GuidedDecodingParams(json={"b": 1, "a": 2})
    as_text = GuidedDecodingParams(json='{"b": 1, "a": 2}')
    assert grammar_key(as_dict) == grammar_key(as_text) == ("json", '{"b": 1, "a": 2}')
    assert grammar_key(GuidedDecodingParams(choice=["x", "y"])) == ("choice", ("x", "y"))
    with pytest.raises(ValueError, match="not valid JSON"):
        grammar_key(GuidedDecodingParams(json="{nope"))
    with pytest.raises(ValueError, match="JSON Schema object"):
        grammar_key(GuidedDecodingParams(json="[1]"))
