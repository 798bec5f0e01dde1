"""Regex, choice and EBNF guided decoding with the random tiny model."""

from __future__ import annotations

import re

import pytest

from baton.engine import GuidedDecodingParams, SamplingParams

TEMPERATURES = [0.0, 0.8, 1.5]
SEEDS = range(4)


def _params(guided: GuidedDecodingParams, temp: float, seed: int | None, max_tokens: int = 120):
    return SamplingParams(temperature=temp, seed=seed, max_tokens=max_tokens, guided_decoding=guided)


def _sweep(guided):
    return {
        f"{temp}-{seed}": ("Answer:", _params(guided, temp, seed if temp > 0 else None))
        for temp in TEMPERATURES
        for seed in (SEEDS if temp > 0 else [0])
    }


REGEXES = [
    r"[0-9]{3}-[0-9]{4}",
    r"(yes|no), because [a-z ]{1,20}\.",
    r"[A-Z][a-z]{2,8}@[a-z]{1,6}\.(com|org)",
    r"\d+(\.\d{1,2})?",
    r"[^0-9\n]{5}",  # a negated class: the whole of Unicode but digits and newline
    r"<.{2,6}>",  # '.': any character
]


@pytest.mark.parametrize("pattern", REGEXES)
def test_regex_outputs_full_match(clean_engine, run_all, pattern):
    finals = run_all(clean_engine, _sweep(GuidedDecodingParams(regex=pattern)))
    for rid, out in finals.items():
        text = out.outputs[0].text
        assert out.outputs[0].finish_reason == "stop", (rid, text)
        assert re.fullmatch(pattern, text), (rid, text)
        assert "\ufffd" not in text  # no invalid UTF-8 (surrogate encodings) slipped through


def test_choice_outputs_are_one_of_the_choices(clean_engine, run_all):
    choices = ["positive", "negative", "neutral", 'say "hi"\n', "東京", "a"]
    finals = run_all(clean_engine, _sweep(GuidedDecodingParams(choice=choices)))
    seen = set()
    for rid, out in finals.items():
        assert out.outputs[0].finish_reason == "stop"
        assert out.outputs[0].text in choices, (rid, out.outputs[0].text)
        seen.add(out.outputs[0].text)
    assert len(seen) > 1  # sampling explores the choices


# Arithmetic with bounded length and nesting, so a random model always finishes.
ARITHMETIC = r"""
root ::= expr
expr ::= term (op term){0,3}
term ::= num | "(" inner ")"
inner ::= num (op num){0,3}
op ::= " + " | " - " | " * "
num ::= [1-9] [0-9]{0,2} | "0"
"""


class _Arithmetic:
    """Recursive-descent recogniser of ARITHMETIC that also evaluates the expression."""

    def __init__(self, text: str):
        self.text, self.pos = text, 0

    def parse(self) -> int:
        value = self.expr(max_terms=4, nested=True)
        if self.pos != len(self.text):
            raise ValueError(f"trailing text at {self.pos}: {self.text!r}")
        return value

    def expr(self, max_terms: int, nested: bool) -> int:
        parts = [str(self.term(nested))]
        while len(parts) < 2 * max_terms - 1 and self.text.startswith((" + ", " - ", " * "), self.pos):
            parts.append(self.text[self.pos + 1])
            self.pos += 3
            parts.append(str(self.term(nested)))
        return eval(" ".join(parts))  # digits and + - * only: built by this parser

    def term(self, nested: bool) -> int:
        if nested and self.text.startswith("(", self.pos):
            self.pos += 1
            value = self.expr(max_terms=4, nested=False)
            if not self.text.startswith(")", self.pos):
                raise ValueError(f"expected ) at {self.pos}: {self.text!r}")
            self.pos += 1
            return value
        match = re.compile(r"0|[1-9][0-9]{0,2}").match(self.text, self.pos)
        if match is None:
            raise ValueError(f"expected a number at {self.pos}: {self.text!r}")
        self.pos = match.end()
        return int(match.group())


def test_arithmetic_grammar_derives(clean_engine, run_all):
    guided = GuidedDecodingParams(grammar=ARITHMETIC)
    requests = _sweep(guided)
    # The random model rarely opens a parenthesis; a logits processor that favours "(" runs
    # before the grammar mask, so it makes outputs nest where the grammar allows it.
    paren = clean_engine.tokenizer.encode("(", add_special_tokens=False)[0]

    def favour_paren(token_ids, logits):
        logits[paren] += 20.0
        return logits

    for seed in SEEDS:
        params = _params(guided, 1.0, seed).clone(logits_processors=[favour_paren])
        requests[f"nested-{seed}"] = ("Answer:", params)
    finals = run_all(clean_engine, requests)
    for rid, out in finals.items():
        text = out.outputs[0].text
        assert out.outputs[0].finish_reason == "stop", (rid, text)
        value = _Arithmetic(text).parse()
        assert value == eval(text), text  # Python agrees on the meaning
        if rid.startswith("nested"):
            assert "(" in text, (rid, text)


def test_the_recogniser_rejects_what_the_grammar_does_not_derive():
    for bad in ["1 +", "01", "(1 + (2))", "1 + 2 + 3 + 4 + 5", "1+2", "(1"]:
        with pytest.raises(ValueError):
            _Arithmetic(bad).parse()
    assert _Arithmetic("(1 + 2) * 3").parse() == 9
