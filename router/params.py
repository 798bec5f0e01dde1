"""From an OpenAI request body to token-id prompts and `SamplingParams`, or a 400.

Every rule that decides whether a request is acceptable lives here or in
`SamplingParams`; a `ValueError` from either becomes a 400 naming the parameter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from baton.router.errors import APIError, bad_request
from baton.router.fields import refuse_unimplemented
from baton.router.protocol import (
    MAX_PROMPTS,
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
)
from baton.router.tools import template_message
from baton.sampling_params import GuidedDecodingParams, SamplingParams
from baton.tokenizer import (
    ChatTemplateError,
    Tokenizer,
    TooManyTokens,
    compile_template,
    utf8_length,
)

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


@dataclass(frozen=True)
class Prompt:
    token_ids: list[int]
    text: str | None = None


def _param_error(exc: ValueError) -> APIError:
    message = str(exc)
    param = message.split(" ", 1)[0] if message else None
    known = set(SamplingParams.__dataclass_fields__)
    return bad_request(message, param if param in known else None)


def _reject_unsupported(req: SamplingFields) -> None:
    refuse_unimplemented(req.model_extra or {}, isinstance(req, ChatCompletionRequest))
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed when stream is true (as OpenAI says)",
                          "stream_options")
    for option in ("continuous_usage_stats", "include_obfuscation"):
        if req.stream_options is not None and getattr(req.stream_options, option):
            raise bad_request(f"stream_options.{option} is not supported by Baton; leave it out",
                              f"stream_options.{option}")
    if isinstance(req, CompletionRequest):
        if req.best_of is not None and req.best_of < req.n:
            raise bad_request(f"best_of ({req.best_of}) must be >= n ({req.n})", "best_of")
        if req.stream and num_candidates(req) > req.n:
            raise bad_request("best_of > n cannot be streamed: the best outputs are known only at "
                              "the end (OpenAI refuses it too); set stream to false", "best_of")


GUIDED_FIELDS = (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                 ("guided_grammar", "grammar"))


def guided_field(req: SamplingFields) -> str | None:
    """The request field that carries its structured-output constraint, for errors."""
    if isinstance(req, ChatCompletionRequest) and req.tools and req.tool_choice not in (None, "none", "auto"):
        return "tools"  # required or named: the constraint is built from the tools' schemas
    return _constraint_field(req)


def _constraint_field(req: SamplingFields) -> str | None:
    fmt = req.response_format
    if fmt is not None and fmt.type != "text":
        return "response_format"
    return next((f for f, _ in GUIDED_FIELDS if getattr(req, f) is not None), None)


def guided_error(error: APIError, req: SamplingFields) -> APIError:
    """A worker's 400 about the guided-decoding constraint (it failed to compile) names the
    request field that carries it, in `param` and in the message."""
    field = guided_field(req)
    if field is None or error.status != 400 or not error.message.startswith("guided_decoding"):
        return error
    head, _, rest = error.message.partition(" ")
    return bad_request(f"{field} ({head}) {rest}", field)


def guided_decoding(req: SamplingFields, tool_guided: GuidedDecodingParams | None = None
                    ) -> GuidedDecodingParams | None:
    """response_format or vLLM's guided_* fields -> GuidedDecodingParams (at most one);
    `tool_guided` (a required or named tool_choice's) excludes them all."""
    if tool_guided is not None:
        field = _constraint_field(req)
        if field is not None:
            raise bad_request(f"{field} cannot be combined with tool_choice {req.tool_choice!r}: the tool "
                              "call's format is the output's constraint", field)
        return tool_guided
    given: dict[str, Any] = {}
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_object":
        given["json_object"] = True
    elif fmt is not None and fmt.type == "json_schema":
        schema = fmt.json_schema.schema_ if fmt.json_schema is not None else None
        if not isinstance(schema, dict):
            raise bad_request("response_format.json_schema.schema must be a JSON object",
                              "response_format")
        given["json"] = schema
    for field, key in GUIDED_FIELDS:
        value = getattr(req, field)
        if value is not None:
            if key in given:
                raise bad_request(f"{field} conflicts with response_format", field)
            given[key] = value
    if not given:
        return None
    if len(given) > 1:
        raise bad_request(f"give one structured-output constraint, got {sorted(given)}",
                          "response_format")
    try:
        return GuidedDecodingParams(**given)
    except ValueError as exc:
        raise bad_request(str(exc), "response_format") from exc


def num_candidates(req: SamplingFields) -> int:
    """Outputs generated per prompt: completions' `best_of`, else `n`."""
    best_of = getattr(req, "best_of", None)
    return best_of if best_of is not None else req.n


def prompt_logprobs(req: SamplingFields, logprobs: int | None) -> int | None:
    """The prompt logprobs the workers compute: what `prompt_logprobs` asks, and for
    completions' `echo` with `logprobs` the top `logprobs` of each echoed prompt token."""
    asked = [k for k in (req.prompt_logprobs, logprobs if getattr(req, "echo", False) else None) if k is not None]
    return max(asked) if asked else None


def sampling_params(req: SamplingFields, max_tokens: int | None, logprobs: int | None,
                    vocab_size: int | None = None, tool_guided: GuidedDecodingParams | None = None
                    ) -> SamplingParams:
    """One output's params (n=1: the router fans n out, best_of candidates too: each then
    reports its tokens' logprobs, which rank them); `tool_guided`: the constraint of a
    required or named tool_choice (router/tools.py). Raises APIError(400)."""
    _reject_unsupported(req)
    if isinstance(req, ChatCompletionRequest) and req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs set to true", "top_logprobs")
    for name in ("stop_token_ids", "allowed_token_ids"):
        ids = getattr(req, name)
        bad = next((t for t in ids if t >= vocab_size), None) if vocab_size is not None and ids else None
        if bad is not None:
            raise bad_request(f"{name}: token id {bad} is out of range: the vocabulary has "
                              f"{vocab_size} tokens", name)
    fields: dict[str, Any] = dict(
        logit_bias=_logit_bias(req.logit_bias, vocab_size),
        allowed_token_ids=req.allowed_token_ids,
        bad_words=req.bad_words,
        n=1,
        max_tokens=max_tokens,
        stop=req.stop,
        seed=req.seed,
        min_tokens=req.min_tokens,
        ignore_eos=req.ignore_eos,
        stop_token_ids=req.stop_token_ids,
        logprobs=logprobs if logprobs is not None or num_candidates(req) == req.n else 0,
        prompt_logprobs=prompt_logprobs(req, logprobs),
        skip_special_tokens=req.skip_special_tokens,
        spaces_between_special_tokens=req.spaces_between_special_tokens,
        include_stop_str_in_output=req.include_stop_str_in_output,
        guided_decoding=guided_decoding(req, tool_guided),
    )
    for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty",
                 "frequency_penalty", "repetition_penalty"):
        value = getattr(req, name)
        if value is not None:
            fields[name] = value
    if isinstance(req.stop, list) and len(req.stop) > 64:
        raise bad_request("stop takes at most 64 strings", "stop")
    try:
        return SamplingParams(**fields)
    except ValueError as exc:
        raise _param_error(exc) from exc


def _logit_bias(given: dict[str, float] | None, vocab_size: int | None) -> dict[int, float] | None:
    """OpenAI's logit_bias (token ids as JSON keys) -> {token id: bias}; 400 naming it for a
    key that is no token id of the vocabulary or a bias outside [-100, 100]."""
    if not given:
        return None
    bias: dict[int, float] = {}
    for key, value in given.items():
        if not (key.isascii() and key.isdigit() and len(key) <= 10) or (vocab_size is not None and int(key) >= vocab_size):
            raise bad_request(f"logit_bias: {key!r} is not a token id of the vocabulary "
                              f"(0 to {vocab_size - 1 if vocab_size else '?'})", "logit_bias")
        if not -100.0 <= value <= 100.0:
            raise bad_request(f"logit_bias: the bias of token {key} must be in [-100, 100], got {value}",
                              "logit_bias")
        bias[int(key)] = value
    return bias


def truncation(req: SamplingFields, max_model_len: int) -> int | None:
    """vLLM's `truncate_prompt_tokens`: how many of the prompt's last tokens to keep (-1:
    `max_model_len`), or None to keep them all; 400 naming it for 0, values below -1 and
    values above `max_model_len` (vLLM's rules)."""
    k = req.truncate_prompt_tokens
    if k is None:
        return None
    if k == 0 or k < -1:
        raise bad_request(f"truncate_prompt_tokens must be an integer >= 1 or -1, got {k}", "truncate_prompt_tokens")
    if k > max_model_len:
        raise bad_request(f"truncate_prompt_tokens value ({k}) is greater than max_model_len ({max_model_len}). "
                          "Please, select a smaller truncation size.", "truncate_prompt_tokens")
    return max_model_len if k == -1 else k


def truncated(prompt: Prompt, keep: int | None) -> Prompt:
    """The prompt's last `keep` tokens (all when None); a prompt that loses tokens loses its
    text too (echo then shows the tokens kept, decoded)."""
    if keep is None or len(prompt.token_ids) <= keep:
        return prompt
    return Prompt(prompt.token_ids[-keep:])


def check_length(num_prompt_tokens: int, max_tokens: int | None, max_model_len: int,
                 param: str) -> int:
    """The max_tokens to run with; 400 when the prompt plus output cannot fit the context."""
    if num_prompt_tokens == 0:
        raise bad_request("The prompt is empty.", param)
    room = max_model_len - num_prompt_tokens
    if room < 1 or (max_tokens is not None and max_tokens > room):
        asked = num_prompt_tokens + (max_tokens or 1)
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {asked} tokens ({num_prompt_tokens} in the prompt, "
            f"{max_tokens or 1} for the completion). Reduce the prompt or max_tokens.",
            param, "context_length_exceeded")
    return room if max_tokens is None else max_tokens


def prompt_error(exc: ValueError, param: str, max_model_len: int) -> APIError:
    """The 400 for a prompt that could not be tokenised (`Tokenizer.encode`'s errors)."""
    if isinstance(exc, TooManyTokens):
        return bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, your "
            f"prompt has at least {exc.at_least} tokens. Reduce the prompt.",
            param, "context_length_exceeded")
    return bad_request(f"{param}: {exc}", param)


def _check_ids(ids: list[int], vocab_size: int) -> list[int]:
    bad = next((t for t in ids if t >= vocab_size), None)
    if bad is not None:
        raise bad_request(f"token id {bad} is out of range: the vocabulary has {vocab_size} tokens",
                          "prompt")
    return list(ids)


def completion_inputs(req: CompletionRequest, vocab_size: int) -> list[str | list[int]]:
    """The request's prompts: texts (to tokenise) or checked token-id lists."""
    p = req.prompt
    if isinstance(p, str):
        return [p]
    if not p:
        raise bad_request("prompt is an empty list", "prompt")
    if all(isinstance(x, int) for x in p):
        return [_check_ids(p, vocab_size)]
    if len(p) > MAX_PROMPTS:
        raise bad_request(f"at most {MAX_PROMPTS} prompts per request", "prompt")
    if all(isinstance(x, str) for x in p):
        return list(p)
    if all(isinstance(x, list) for x in p):
        return [_check_ids(x, vocab_size) for x in p]
    raise bad_request("prompt must be a string, a list of strings, a list of token ids or a "
                      "list of token-id lists", "prompt")


def _message_dict(index: int, message) -> dict[str, Any]:
    data = message.model_dump(exclude_none=True)
    content = message.content
    if isinstance(content, list):
        texts = []
        for part in content:
            if part.type != "text" or part.text is None:
                raise bad_request(f"messages[{index}]: only text content parts are supported "
                                  f"(got type {part.type!r})", "messages")
            texts.append(part.text)
        content = "".join(texts)
    data["content"] = content if content is not None else ""
    return template_message(index, data)


def _template_kwargs(req: ChatCompletionRequest) -> dict[str, Any]:
    """The template's keyword arguments for a chat request (or /tokenize's chat body, which
    has the same `tools` and `chat_template_kwargs`)."""
    kwargs = dict(req.chat_template_kwargs or {})
    if req.tools:
        kwargs["tools"] = req.tools  # templates that know tools render them (router/tools.py)
    return kwargs


UNTRUSTED_TEMPLATE = ("Chat template is passed with request, but --trust-request-chat-template is not set. "
                      "Refused request with untrusted chat template.")


def chat_options(req: ChatCompletionRequest) -> dict[str, Any]:
    """`Tokenizer.apply_chat_template`'s named arguments for a chat request (or /tokenize's
    chat body, which may lack the last two): `continue_final_message` renders no generation
    prompt, and is a 400 together with `add_generation_prompt` set to true (vLLM refuses
    both); `chat_template` is the request's own template."""
    continue_final = getattr(req, "continue_final_message", False)
    if continue_final and req.add_generation_prompt and "add_generation_prompt" in req.model_fields_set:
        raise bad_request("Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
                          "continue_final_message")
    return {"add_generation_prompt": req.add_generation_prompt and not continue_final,
            "continue_final_message": continue_final, "template": getattr(req, "chat_template", None)}


def check_request_template(req: ChatCompletionRequest, trusted: bool) -> None:
    """A request's own `chat_template`: 400 naming it unless the server trusts such
    templates (`--trust-request-chat-template`, as vLLM), or when it does not compile.
    Blocking: compiles it (the compiled template is cached for the rendering)."""
    if req.chat_template is None:
        return
    if not trusted:
        raise bad_request(UNTRUSTED_TEMPLATE, "chat_template")
    try:
        compile_template(req.chat_template)
    except ChatTemplateError as exc:
        raise bad_request(f"chat_template: {exc}", "chat_template") from None


def chat_role(req: ChatCompletionRequest) -> str:
    """The role of the response's message: the assistant's after a generation prompt, else
    the last message's (its content continues; vLLM's rule)."""
    return "assistant" if chat_options(req)["add_generation_prompt"] else req.messages[-1].role


def chat_echo(req: ChatCompletionRequest) -> str:
    """What chat's `echo` puts before each choice's content: the last message's content when
    its role is the response's (vLLM's rule), else nothing."""
    if not req.echo or req.messages[-1].role != chat_role(req):
        return ""
    return _message_dict(len(req.messages) - 1, req.messages[-1])["content"]


def content_length(req: ChatCompletionRequest) -> int:
    """Characters of text the messages carry (what makes a chat prompt large)."""
    total = 0
    for message in req.messages:
        parts = message.content if isinstance(message.content, list) else [message.content]
        total += sum(len(p if isinstance(p, str) else p.text or "") for p in parts if p is not None)
    return total


def chat_text_bytes(req: ChatCompletionRequest, tokenizer: Tokenizer) -> int | None:
    """UTF-8 bytes of the rendered conversation, found without rendering its contents: the
    template renders placeholders, each must appear exactly once, and the contents' lengths
    replace theirs. None when the template does not place every content once, or the text
    is cut after the final message (`continue_final_message`): then only rendering it tells.
    Raises 400 as `chat_text` does."""
    options = chat_options(req)
    if options["continue_final_message"]:
        return None
    messages = [_message_dict(i, m) for i, m in enumerate(req.messages)]
    marks = [f"\x00baton-content-{i}\x00" for i in range(len(messages))]
    contents = [m["content"] for m in messages]
    for message, mark in zip(messages, marks):
        message["content"] = mark
    try:
        text = tokenizer.apply_chat_template(messages, **options, **_template_kwargs(req))
    except Exception as exc:  # a template fails on what the messages hold: the client's input
        raise bad_request(f"cannot apply the chat template: {exc}", "messages") from exc
    if any(text.count(mark) != 1 for mark in marks):
        return None
    try:
        return utf8_length(text) - sum(len(mark) for mark in marks) + sum(utf8_length(c) for c in contents)
    except ValueError as exc:
        raise bad_request(f"messages: {exc}", "messages") from None


def chat_messages(req: ChatCompletionRequest) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The messages as the chat template reads them, each "content" one str (text parts
    joined), and the template's keyword arguments; 400 for content that is not text."""
    return [_message_dict(i, m) for i, m in enumerate(req.messages)], _template_kwargs(req)


def chat_text(req: ChatCompletionRequest, tokenizer: Tokenizer) -> str:
    """The conversation rendered by the chat template (the template writes BOS itself, so
    the text is tokenised without special tokens). Blocking: may render megabytes."""
    messages, kwargs = chat_messages(req)
    options = chat_options(req)
    try:
        return tokenizer.apply_chat_template(messages, **options, **kwargs)
    except Exception as exc:  # a template fails on what the messages hold: the client's input
        raise bad_request(f"cannot apply the chat template: {exc}", "messages") from exc
