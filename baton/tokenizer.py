"""Tokenizer, chat template and incremental detokenisation (no torch here).

Reads a Hugging Face model directory: `tokenizer.json` (the `tokenizers` library),
`tokenizer_config.json` (special tokens, chat template), `generation_config.json` and
`config.json` (end-of-sequence ids).
"""

from __future__ import annotations

import array
import functools
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers.decoders import DecodeStream

_CONTEXT = 5  # prompt tokens of left context for detokenisation


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


class ChatTemplateError(ValueError):
    """The chat template failed on the conversation it was given (the client's input)."""


class TooManyTokens(ValueError):
    """The text has more than `limit` tokens: at least `at_least` (a bound, not a count)."""

    def __init__(self, at_least: int, limit: int):
        super().__init__(f"the text has at least {at_least} tokens, more than the limit of {limit}")
        self.at_least = at_least
        self.limit = limit


def _token_content(value: Any) -> str | None:
    # tokenizer_config.json writes special tokens as strings or as AddedToken dicts.
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    """A model's tokenizer with its chat template and end-of-sequence ids."""

    def __init__(self, model_dir: str | Path, chat_template: str | None = None):
        """`chat_template`: Jinja text that replaces the model's own (ValueError if it does
        not compile)."""
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(
                f"{model_dir} has no tokenizer.json; Baton reads fast (tokenizers) tokenizers only"
            )
        self.path = path
        self._tok = _HFTokenizer.from_file(str(path))
        self._max_token_bytes = _max_token_bytes(json.loads(path.read_text()))
        config = _read_json(model_dir / "tokenizer_config.json")
        self.chat_template: str | None = config.get("chat_template")
        if isinstance(self.chat_template, list):  # named templates: take the default one
            named = {t["name"]: t["template"] for t in self.chat_template}
            self.chat_template = named.get("default") or next(iter(named.values()))
        template_file = model_dir / "chat_template.jinja"
        if self.chat_template is None and template_file.exists():
            self.chat_template = template_file.read_text()
        self.bos_token = _token_content(config.get("bos_token"))
        self.eos_token = _token_content(config.get("eos_token"))
        self.pad_token = _token_content(config.get("pad_token"))
        self.eos_token_ids = self._find_eos_ids(model_dir)
        # the added (special) tokens: id -> text
        self.added_tokens = {i: t.content for i, t in self._tok.get_added_tokens_decoder().items()}
        self.special_ids = set(self.added_tokens)
        self._template: jinja2.Template | None = None
        if chat_template is not None:
            self.chat_template = chat_template
            try:
                self._template = _compile_template(chat_template)
            except jinja2.TemplateError as exc:
                raise ValueError(f"the chat template does not compile: {exc}") from exc

    def _find_eos_ids(self, model_dir: Path) -> list[int]:
        ids: list[int] = []
        for name in ("generation_config.json", "config.json"):
            value = _read_json(model_dir / name).get("eos_token_id")
            if value is not None:
                ids = [value] if isinstance(value, int) else list(value)
                break
        if not ids and self.eos_token is not None:
            token_id = self._tok.token_to_id(self.eos_token)
            if token_id is not None:
                ids = [token_id]
        return ids

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True, max_tokens: int | None = None) -> list[int]:
        """Token ids of `text`. Raises ValueError for text that is not valid Unicode (a lone
        surrogate), and TooManyTokens when it has more than `max_tokens` tokens (see
        `check_length`: a text whose length alone proves that is not tokenised)."""
        self.check_length(text, max_tokens)
        encoding = self._tok.encode(text, add_special_tokens=add_special_tokens)
        if max_tokens is not None and len(encoding) > max_tokens:
            raise TooManyTokens(len(encoding), max_tokens)
        return encoding.ids

    def check_length(self, text: str, max_tokens: int | None) -> None:
        """Cheap checks before tokenising: ValueError for text UTF-8 cannot encode; TooManyTokens
        when its UTF-8 length proves more than `max_tokens` tokens (no token covers more bytes
        of text than the longest one in the vocabulary spells)."""
        self.check_size(utf8_length(text), max_tokens)

    def check_size(self, num_bytes: int, max_tokens: int | None) -> None:
        """TooManyTokens when a text of `num_bytes` UTF-8 bytes certainly has more than
        `max_tokens` tokens."""
        if max_tokens is not None and self._max_token_bytes:
            at_least = -(-num_bytes // self._max_token_bytes)
            if at_least > max_tokens:
                raise TooManyTokens(at_least, max_tokens)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def bad_words_token_ids(self, words: list[str]) -> list[list[int]]:
        """The token sequences vLLM bans for `bad_words`: each word (leading spaces stripped)
        as it is tokenised at the start of a text, and with one leading space (as it appears
        in the middle of one) where that gives other tokens of the same count."""
        banned: list[list[int]] = []
        for word in words:
            bare = self._tok.encode(word.lstrip(), add_special_tokens=False).ids
            spaced = self._tok.encode(" " + word.lstrip(), add_special_tokens=False).ids
            if not bare:
                raise ValueError(f"bad_words: {word!r} has no text besides spaces")
            banned.append(bare)
            if spaced[0] != bare[0] and len(spaced) == len(bare):
                banned.append(spaced)
        return banned

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        template: str | None = None,
        **kwargs: Any,
    ) -> str:
        """Render a conversation to the prompt text the model was trained on.

        `template`: Jinja text used instead of the model's (a request's own, rendered in the
        same sandbox; ValueError if it does not compile). `continue_final_message`: the text
        ends with the last message's content, open for the model to continue (transformers'
        rule: cut after the content's last occurrence; ValueError when the template did not
        write it verbatim)."""
        if template is not None:
            compiled = compile_template(template)
        else:
            if self.chat_template is None:
                raise ValueError(
                    "this model has no chat template (tokenizer_config.json: chat_template); "
                    "use the completions API instead"
                )
            if self._template is None:
                self._template = _compile_template(self.chat_template)
            compiled = self._template
        try:
            text = compiled.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                **kwargs,
            )
        except jinja2.TemplateError as exc:
            raise ValueError(f"chat template failed: {exc}") from exc
        return _open_final_message(text, messages) if continue_final_message else text


def _open_final_message(text: str, messages: list[dict[str, Any]]) -> str:
    """The rendered conversation cut right after the final message's content (as
    transformers' `continue_final_message` cuts it)."""
    final = messages[-1].get("content") or "" if messages else ""
    stripped = final.strip()
    if stripped not in text:
        raise ValueError("continue_final_message is set but the final message does not appear in the chat "
                         "after applying the chat template")
    at = text.rindex(stripped)
    # keep the content's trailing spaces where the template kept them
    kept = len(final.lstrip()) if text[at:at + len(final.lstrip())] == final.lstrip() else len(stripped)
    return text[:at + kept]


_UTF8_SLICE = 1 << 18  # characters encoded per call by utf8_length


def utf8_length(text: str) -> int:
    """UTF-8 bytes of `text` (for ASCII text, its length, at no cost); ValueError for text
    UTF-8 cannot encode. Long text is encoded a slice at a time, so that a caller on a
    thread lets the event loop have the GIL between slices."""
    if text.isascii():
        return len(text)
    total = 0
    for start in range(0, len(text), _UTF8_SLICE):
        try:
            total += len(text[start:start + _UTF8_SLICE].encode("utf-8"))
        except UnicodeEncodeError as exc:
            raise ValueError(f"the text is not valid Unicode ({exc.reason} at {start + exc.start})") from None
    return total


class ChildEncoder:
    """Tokenises long texts in a child process, for a caller whose event loop must not stall.

    Tokenising runs without the GIL in Rust, but building and freeing the result's Python
    objects (an `Encoding` of millions of tokens) holds it for a long time; in a child
    process none of that touches the caller. A long conversation is rendered by the chat
    template there too (`encode_chat`): the template's string concatenations copy each
    content in single calls that hold the GIL. What crosses the pipe is never pickled whole:
    pickling a text of megabytes is one call that holds the GIL, and so the event loop, for
    as long as it copies. The text goes as UTF-8 slices of `CHUNK_CHARS` characters, the ids
    come back as one `uint32` buffer and become a list `CHUNK_IDS` ids at a time, all on one
    thread of the caller, so the loop gets the GIL between slices.

    The child is spawned (the caller may have threads) on first use, runs at a lower CPU
    priority than the caller (on a busy host the server's loop must win the cores over a
    tokenisation that takes seconds) and in a session of its own (where the kernel groups
    tasks by session, "autogroup", niceness only ranks tasks within one group, and a child
    busy in the caller's group spends that group's share of the CPU: the caller's loop then
    waits for the other groups at each wake-up), tokenises one text at a time, and is
    started again if it died.
    """

    CHUNK_CHARS = 1 << 18
    CHUNK_IDS = 1 << 16

    def __init__(self, tokenizer: Tokenizer):
        from concurrent.futures import ThreadPoolExecutor

        self._tokenizer = tokenizer
        self._io = ThreadPoolExecutor(1, thread_name_prefix="tokenizer-child")
        self._process = None
        self._conn = None
        self._closed = False

    async def encode(self, text: str, add_special_tokens: bool, max_tokens: int | None) -> list[int]:
        """As `Tokenizer.encode`, awaited. TooManyTokens carries the exact count when the
        text has more than `max_tokens` tokens."""

        import asyncio

        # Off the loop: for long non-ASCII text the check is a UTF-8 encode of all of it.
        await asyncio.get_running_loop().run_in_executor(None, self._tokenizer.check_length, text, max_tokens)
        return await self._request(("text", add_special_tokens), [text], max_tokens)

    async def encode_chat(self, messages: list[dict[str, Any]], options: dict[str, Any],
                          template_kwargs: dict[str, Any], max_tokens: int | None,
                          add_special_tokens: bool = False) -> list[int]:
        """The ids of `Tokenizer.apply_chat_template(messages, **options, **template_kwargs)`
        (`options`: its named arguments), tokenised without special tokens unless
        `add_special_tokens` (the template writes BOS), all in the child: nothing of the
        conversation's size is built here. Each message's "content" is a str.
        ChatTemplateError when the template fails; TooManyTokens as `encode`."""
        skeleton = [{k: v for k, v in m.items() if k != "content"} for m in messages]
        return await self._request(("chat", skeleton, options, template_kwargs, add_special_tokens),
                                   [m["content"] for m in messages], max_tokens)

    async def _request(self, request: tuple, texts: list[str], max_tokens: int | None) -> list[int]:
        import asyncio

        kind, value = await asyncio.get_running_loop().run_in_executor(
            self._io, self._exchange, request, texts, max_tokens)
        if kind == "too_many":
            raise TooManyTokens(value, max_tokens)
        return value

    def _exchange(self, request: tuple, texts: list[str], max_tokens: int | None) -> tuple[str, Any]:
        """On the I/O thread: one request to the child, started again once if it died."""
        for attempt in (1, 2):
            if self._closed:
                raise RuntimeError("the tokenizer's child process was closed")
            if self._conn is None:
                self._start()
            try:
                return self._round_trip(request, texts, max_tokens)
            except (EOFError, OSError):
                self._stop()
                if attempt == 2:
                    raise RuntimeError("the tokenizer's child process died twice in a row") from None
        raise AssertionError("unreachable")

    def _round_trip(self, request: tuple, texts: list[str], max_tokens: int | None) -> tuple[str, Any]:
        step = self.CHUNK_CHARS
        self._conn.send((request, max_tokens, [len(range(0, len(text), step)) for text in texts]))
        for text in texts:
            for start in range(0, len(text), step):
                self._conn.send_bytes(text[start:start + step].encode("utf-8"))
        kind, value = self._conn.recv()
        if kind == "error":
            raise ValueError(value)
        if kind == "template_error":
            raise ChatTemplateError(value)
        if kind == "too_many":
            return kind, value
        ids = memoryview(self._conn.recv_bytes()).cast("I")
        out: list[int] = []
        for start in range(0, len(ids), self.CHUNK_IDS):
            out.extend(ids[start:start + self.CHUNK_IDS])
        return kind, out

    def _start(self) -> None:
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        parent, child = context.Pipe()
        # The template in use goes along: a --chat-template replaces the model's.
        self._process = context.Process(target=_child_main, args=(child, str(self._tokenizer.path.parent),
                                                                   self._tokenizer.chat_template),
                                        name="baton-tokenizer", daemon=True)
        self._process.start()
        child.close()
        self._conn = parent

    def _stop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._process is not None:
            self._process.kill()
            self._process.join(5)
            self._process = None

    def close(self) -> None:
        self._closed = True
        self._io.shutdown(wait=False, cancel_futures=True)
        self._stop()


CHILD_NICENESS = 10  # added to the child's niceness: lower priority than the server


def _child_main(conn, model_dir: str, chat_template: str | None = None) -> None:
    """The child's loop: (request, max_tokens, chunk count per text), then each text's UTF-8
    chunks -> ("ids", n) and the ids as uint32 bytes, or ("too_many", count), ("error",
    message) or ("template_error", message). A request is ("text", add_special_tokens) for
    one text, or ("chat", messages without content, apply_chat_template's named arguments,
    template kwargs, add_special_tokens) with one text per message, its content."""
    import os

    os.setsid()  # a scheduling group of its own, apart from the caller's (see ChildEncoder)
    os.nice(CHILD_NICENESS)
    tokenizer = Tokenizer(model_dir, chat_template)
    while True:
        try:
            request, max_tokens, counts = conn.recv()
            texts = [b"".join(conn.recv_bytes() for _ in range(n)).decode("utf-8") for n in counts]
        except EOFError:
            return  # the parent closed the pipe or exited
        if request[0] == "text":
            text, add_special_tokens = texts[0], request[1]
        else:
            _, skeleton, options, kwargs, add_special_tokens = request
            messages = [{**m, "content": content} for m, content in zip(skeleton, texts)]
            try:
                text = tokenizer.apply_chat_template(messages, **options, **kwargs)
            except Exception as exc:  # the template failed on the client's conversation
                conn.send(("template_error", str(exc)))
                continue
        del texts
        try:
            encoding = tokenizer._tok.encode(text, add_special_tokens=add_special_tokens)
        except Exception as exc:  # the tokenizer refused the text: the caller's 400
            conn.send(("error", str(exc)))
            continue
        del text
        if max_tokens is not None and len(encoding) > max_tokens:
            conn.send(("too_many", len(encoding)))
            continue
        conn.send(("ids", len(encoding)))
        conn.send_bytes(array.array("I", encoding.ids))


def _max_token_bytes(spec: dict) -> int | None:
    """UTF-8 bytes of the longest token string in a tokenizer.json (at least the bytes of
    text any one token covers), or None when the normalizer may shrink the text, where no
    such bound holds. Byte-level and SentencePiece-style spellings (`Ġ`, `▁`, `<0x0A>`)
    are never shorter than the text they stand for."""
    normalizer = spec.get("normalizer")
    parts = normalizer.get("normalizers", []) if normalizer and normalizer.get("type") == "Sequence" else [normalizer]
    if any(part and part.get("type") not in ("Prepend", "Replace") for part in parts):
        return None
    if (spec.get("model") or {}).get("fuse_unk"):  # a run of unknown text may be one token
        return None
    vocab = (spec.get("model") or {}).get("vocab") or {}
    names = list(vocab) if isinstance(vocab, dict) else [entry[0] for entry in vocab]  # BPE / Unigram
    names += [t.get("content", "") for t in spec.get("added_tokens", [])]
    return max((len(name.encode("utf-8")) for name in names), default=0) or None


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


@functools.lru_cache(maxsize=32)
def _compile_cached(source: str) -> jinja2.Template:
    """Requests' own templates, compiled once while they keep coming."""
    return _compile_template(source)


def compile_template(source: str) -> jinja2.Template:
    """A request's chat template, compiled (and kept for its next rendering);
    ChatTemplateError if it does not compile."""
    try:
        return _compile_cached(source)
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"the chat template does not compile: {exc}") from None


def _compile_template(source: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = lambda value, indent=None: json.dumps(
        value, ensure_ascii=False, indent=indent
    )
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Each delta is decoded with a few tokens of left context (so tokenizers that merge a
    leading space decode right), and nothing is emitted while the text ends in an
    incomplete UTF-8 sequence: a delta never contains half a character.

    `spaces_between_special_tokens=False` (with `skip_special_tokens=False`): a special
    (added) token that follows another one is its bare text, without the space a decoder may
    put before it (vLLM's fast detokenizer's rule).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: list[int],
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        # token id -> text of the added tokens, when their spacing is to be suppressed
        self._added = (None if skip_special_tokens or spaces_between_special_tokens
                       else tokenizer.added_tokens or None)
        self._last_special = False
        context = list(prompt_token_ids[-_CONTEXT:])
        # The Rust DecodeStream does the offset bookkeeping (a third of the cost of decoding
        # slices twice per token); the prompt's tail is its left context.
        self._stream = DecodeStream(ids=context, skip_special_tokens=skip_special_tokens)
        self._context = context  # ids whose text is out: left context for flush()
        self._pending: list[int] = []  # ids added since the last emitted text
        self.text = ""

    def add(self, token_id: int) -> str:
        """Append one token; return the newly complete text (maybe empty)."""
        self._pending.append(token_id)
        chunk = self._stream.step(self._tokenizer._tok, token_id)
        if self._added is not None:
            special = self._added.get(token_id)
            if special is not None and self._last_special and len(self._pending) == 1:
                chunk = special
            self._last_special = special is not None
        if not chunk:  # None: an incomplete character is held back
            return ""
        self._context = (self._context + self._pending)[-_CONTEXT:]
        self._pending = []
        self.text += chunk
        return chunk

    def flush(self) -> str:
        """At the end of a request: return whatever is still held back (even a lone byte)."""
        if not self._pending:
            return ""
        decode = self._tokenizer.decode
        before = decode(self._context, self._skip)
        after = decode(self._context + self._pending, self._skip)
        delta = after[len(before) :] if len(after) > len(before) else ""
        self._context = (self._context + self._pending)[-_CONTEXT:]
        self._pending = []
        self.text += delta
        return delta
