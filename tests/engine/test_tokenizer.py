"""Tokenizer, chat template, incremental detokenisation, sampling-parameter validation."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest

from baton.sampling_params import GuidedDecodingParams, SamplingParams
from baton.tokenizer import (
    ChatTemplateError,
    ChildEncoder,
    IncrementalDetokenizer,
    Tokenizer,
    TooManyTokens,
    utf8_length,
)


@pytest.fixture(scope="module")
def tok(tiny_dir) -> Tokenizer:
    return Tokenizer(tiny_dir)


@pytest.fixture(scope="module")
def child(tok):
    encoder = ChildEncoder(tok)
    encoder.CHUNK_CHARS = 1000  # many slices, some split between the bytes of one character
    yield encoder
    encoder.close()


# Multi-byte characters, so that slices of characters are not slices of bytes.
LONG_TEXT = "héllo wörld, 日本語のテキスト; plain words too. " * 300


def test_the_child_process_tokenises_as_the_tokenizer_does(tok, child):
    for special in (True, False):
        assert asyncio.run(child.encode(LONG_TEXT, special, None)) == tok.encode(LONG_TEXT, special)


def test_the_child_process_counts_a_text_over_the_limit(tok, child):
    count = len(tok.encode(LONG_TEXT))
    with pytest.raises(TooManyTokens) as info:
        asyncio.run(child.encode(LONG_TEXT, True, count - 1))
    assert info.value.at_least == count


def test_the_child_process_renders_and_tokenises_a_conversation_as_the_router_does(tok, child):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": LONG_TEXT},
                {"role": "assistant", "content": ""}, {"role": "user", "content": LONG_TEXT[:999]}]
    expected = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False)
    assert asyncio.run(child.encode_chat(messages, {"add_generation_prompt": True}, {}, None)) == expected


def test_the_child_process_renders_with_a_replaced_chat_template_and_tools(tok):
    template = "{% for t in tools %}[{{ t.function.name }}]{% endfor %}{% for m in messages %}<{{ m.content }}>{% endfor %}"
    replaced = Tokenizer(tok.path.parent, template)
    encoder = ChildEncoder(replaced)
    tools = {"tools": [{"type": "function", "function": {"name": "get_weather"}}]}
    messages = [{"role": "user", "content": LONG_TEXT}]
    try:
        ids = asyncio.run(encoder.encode_chat(messages, {"add_generation_prompt": True}, tools, None))
    finally:
        encoder.close()
    assert ids == replaced.encode(f"[get_weather]<{LONG_TEXT}>", add_special_tokens=False)


def test_a_chat_template_that_fails_in_the_child_process_says_why(tok, tmp_path):
    for name in ("tokenizer.json", "config.json"):
        (tmp_path / name).write_bytes((tok.path.parent / name).read_bytes())
    template = "{% if messages[0].role == 'system' %}{{ raise_exception('no system messages') }}{% endif %}x"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    encoder = ChildEncoder(Tokenizer(tmp_path))
    try:
        with pytest.raises(ChatTemplateError, match="no system messages"):
            asyncio.run(encoder.encode_chat([{"role": "system", "content": LONG_TEXT}], {}, {}, None))
        assert asyncio.run(encoder.encode_chat([{"role": "user", "content": "hi"}], {}, {}, None)) == \
            Tokenizer(tmp_path).encode("x", add_special_tokens=False)  # the child still serves
    finally:
        encoder.close()


def test_a_child_process_that_died_is_started_again(tok, child):
    asyncio.run(child.encode("warm", True, None))
    child._process.kill()
    child._process.join(10)
    assert asyncio.run(child.encode(LONG_TEXT, True, None)) == tok.encode(LONG_TEXT)


def test_the_child_process_runs_in_a_session_of_its_own_at_a_lower_priority(child):
    asyncio.run(child.encode("warm", True, None))
    pid = child._process.pid
    assert os.getsid(pid) == pid != os.getsid(0)  # its own scheduling group under autogroup
    assert os.getpriority(os.PRIO_PROCESS, pid) > os.getpriority(os.PRIO_PROCESS, 0)


def test_utf8_length_of_a_long_text_counted_in_slices():
    text = "héllo 日本 😀 " * 100_000  # several slices
    assert utf8_length(text) == len(text.encode("utf-8"))
    broken = text + "\ud800"
    with pytest.raises(ValueError, match=f"at {len(text)}"):
        utf8_length(broken)


def test_chat_template_renders_the_conversation(tok):
    text = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert text == "<|begin_of_text|><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.encode(text, add_special_tokens=False)
    assert ids.count(0) == 1 and tok.decode(ids, skip_special_tokens=False) == text


def test_incremental_detokenisation_never_emits_half_a_character(tok):
    text = "café 東京 😀 ok"
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [0])
    deltas = [detok.add(t) for t in ids]
    assert "".join(deltas) + detok.flush() == text
    assert not any("\ufffd" in d for d in deltas)
    # Multi-byte characters span several byte-level tokens here, so some deltas were held.
    assert "" in deltas


def test_flush_returns_an_incomplete_tail(tok):
    partial = tok.encode("東", add_special_tokens=False)[:-1]
    detok = IncrementalDetokenizer(tok, [0])
    assert "".join(detok.add(t) for t in partial) == ""
    tail = detok.flush()
    assert tail and set(tail) == {"\ufffd"}  # the held-back bytes come out at the end


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_k": -5}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
        ({"logprobs": 50}, "logprobs"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"seed": -1}, "seed"),
        ({"stop": [""]}, "stop"),
    ],
)
def test_invalid_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_guided_params_need_exactly_one_constraint():
    with pytest.raises(ValueError, match="exactly one"):
        GuidedDecodingParams()
    with pytest.raises(ValueError, match="exactly one"):
        GuidedDecodingParams(regex="a+", choice=["a"])
    assert GuidedDecodingParams(choice=["yes", "no"]).kind == "choice"


def test_tiny_model_command_writes_a_loadable_model(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "baton.cli", "tiny-model", str(tmp_path / "m")], capture_output=True, text=True, check=True
    ).stdout
    assert "random" in out
    assert Tokenizer(tmp_path / "m").vocab_size == 512
    assert (tmp_path / "m" / "model.safetensors").stat().st_size > 100_000


def test_generate_command_prints_text_and_rejects_bad_input(tiny_dir):
    ok = subprocess.run(
        [sys.executable, "-m", "baton.cli", "generate", "--model", str(tiny_dir), "--max-tokens", "3", "--json", "Hi"],
        capture_output=True, text=True, check=True,
    ).stdout
    assert '"finish_reason": "length"' in ok
    bad = subprocess.run(
        [sys.executable, "-m", "baton.cli", "generate", "--model", str(tiny_dir), "--top-p", "0", "Hi"],
        capture_output=True, text=True,
    )
    assert bad.returncode == 2 and "top_p must be in (0, 1]" in bad.stderr


def test_bad_words_token_ids_follow_vllms_rule(tok):
    def ids(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False)

    # the word alone, and after a space where that tokenises differently in as many tokens
    assert tok.bad_words_token_ids(["fox"]) == [ids("fox"), ids(" fox")]
    assert tok.bad_words_token_ids(["  quick brown"]) == [ids("quick brown"), ids(" quick brown")]
    with pytest.raises(ValueError, match="bad_words"):
        tok.bad_words_token_ids([" "])


def test_spaces_between_special_tokens_false_drops_the_space_a_decoder_puts_between_them(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    # a WordPiece decoder puts a space before every word, special tokens included
    wordpiece = HFTokenizer(models.WordPiece({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    wordpiece.pre_tokenizer = pre_tokenizers.Whitespace()
    wordpiece.decoder = decoders.WordPiece()
    wordpiece.add_special_tokens(["[X]", "[Y]"])
    wordpiece.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer(tmp_path)

    def text(**kwargs) -> str:
        detok = IncrementalDetokenizer(tok, [], **kwargs)
        return "".join(detok.add(t) for t in [1, 3, 4, 3, 2]) + detok.flush()

    assert text(skip_special_tokens=False) == "a [X] [Y] [X] b"
    assert text(skip_special_tokens=False, spaces_between_special_tokens=False) == "a [X][Y][X] b"
    assert text(spaces_between_special_tokens=False) == text() == "a b"


def test_continue_final_message_cuts_after_the_final_content(tok):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  Once upon  "}]
    whole = tok.apply_chat_template(messages, add_generation_prompt=False)
    cut = tok.apply_chat_template(messages, add_generation_prompt=False, continue_final_message=True)
    # the template kept the content verbatim: it ends the text, trailing spaces too
    assert whole.startswith(cut) and cut.endswith("  Once upon  ") and not whole.endswith("Once upon  ")
    dropping = "{% for m in messages %}{{ m['content'] | trim }}|{% endfor %}"
    assert tok.apply_chat_template(messages, continue_final_message=True, template=dropping) == "Hi|Once upon"
    with pytest.raises(ValueError, match="continue_final_message"):
        tok.apply_chat_template(messages, continue_final_message=True, template="{{ messages | length }}")
    with pytest.raises(ChatTemplateError, match="compile"):
        tok.apply_chat_template(messages, template="{% if %}")
