"""Request bodies of the OpenAI API the router serves (pydantic; OpenAPI comes from these).

Types and coarse bounds are checked here (a wrong type is a 400 before anything runs), as
strictly as OpenAI does: no coercion (`"stream": "yes"` or `"n": "2"` is a 400), roles from
OpenAI's list only, and no text that cannot be encoded as UTF-8 anywhere in the body (a
JSON escape of a lone UTF-16 surrogate such as `"\\ud800"` parses into such text; the
400 names the field). The sampling rules themselves live in
`baton.sampling_params.SamplingParams`, which `router/params.py` builds from these. The
completions and chat bodies keep the fields they do not type (`model_extra`): those OpenAI
or vLLM define and Baton does not implement are refused by name (`router/fields.py`); other
unknown fields are ignored, as OpenAI does.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_N = 128  # outputs per prompt
MAX_PROMPTS = 256  # prompts in one completions request
MAX_STOP = 64
MAX_LOGPROBS = 20
MAX_BAD_WORDS = 1024  # each is matched against the output at every step
INT32 = 2**31 - 1

Int32 = Annotated[int, Field(ge=-INT32, le=INT32)]
TokenId = Annotated[int, Field(ge=0, le=INT32)]


ROLES = ("system", "developer", "user", "assistant", "tool", "function")


class UnencodableText(ValueError):
    """Text in the body that is not valid Unicode; `param` is its path (`messages.0.content`),
    with anything UTF-8 cannot hold in it (a key) escaped as `\\udXXX`."""

    def __init__(self, param: str):
        param = param.encode("utf-8", "backslashreplace").decode("utf-8")
        super().__init__(f"'{param}' contains text that cannot be encoded as UTF-8 (a lone UTF-16 "
                         "surrogate such as \\ud800); send valid Unicode text")
        self.param = param


# True while validating a body that pydantic-core's JSON parser parsed (router/edge.py): it
# refuses a lone surrogate, so no text in the body needs the check, which for long non-ASCII
# text is a UTF-8 encode of all of it on the event loop. Per request (a context variable).
PARSED_STRICTLY: ContextVar[bool] = ContextVar("parsed_strictly", default=False)


def find_unencodable(value: Any, path: tuple[str, ...] = ()) -> str | None:
    """The dotted path of the first string (or key) in a parsed JSON value that UTF-8 cannot
    encode, or None. ASCII strings, nearly all of them, cost one flag check."""
    if isinstance(value, str):
        if value.isascii():
            return None
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return ".".join(path) or "body"
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            where = path + (str(key),)
            if isinstance(key, str) and find_unencodable(key) is not None:
                return ".".join(where)
            found = find_unencodable(item, where)
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = find_unencodable(item, path + (str(i),))
            if found is not None:
                return found
    return None


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)


class StreamOptions(_Body):
    include_usage: bool = False
    # Not implemented: refused when true (router/params.py), typed so that they are not ignored
    continuous_usage_stats: bool = False  # vLLM's: usage in every chunk
    include_obfuscation: bool | None = None  # OpenAI's: random padding in every chunk


class JsonSchemaFormat(_Body):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class TextBody(_Body):
    """A body that may carry text: any text UTF-8 cannot encode is a 400 naming its field."""

    @model_validator(mode="before")
    @classmethod
    def _encodable(cls, data: Any) -> Any:
        if PARSED_STRICTLY.get():
            return data
        bad = find_unencodable(data)
        if bad is not None:
            raise UnencodableText(bad)
        return data


class SamplingFields(TextBody):
    """Fields completions and chat share (OpenAI's plus vLLM's extras)."""

    model_config = ConfigDict(extra="allow")  # router/fields.py reads the untyped ones

    model: str = Field(max_length=512)
    max_tokens: Int32 | None = None
    temperature: float | None = Field(default=None, description="0 is greedy; default 1")
    top_p: float | None = None
    n: int = Field(default=1, ge=1, le=MAX_N)
    stop: str | list[str] | None = Field(default=None)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # an end-user id: logged with the request, no effect on the output
    # vLLM's: the response's id is "cmpl-" or "chatcmpl-" and this (printable: it is logged)
    request_id: str | None = Field(default=None, min_length=1, max_length=256, pattern=r"^[^\x00-\x1f\x7f]+$")
    logit_bias: dict[str, float] | None = Field(default=None, max_length=1024)  # token id (decimal) -> bias
    # vLLM extras
    top_k: Int32 | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: Int32 = 0
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] | None = Field(default=None, max_length=MAX_STOP)
    allowed_token_ids: list[TokenId] | None = Field(default=None, min_length=1, max_length=2**20)
    bad_words: list[str] | None = Field(default=None, max_length=MAX_BAD_WORDS)
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    return_tokens_as_token_ids: bool | None = None  # logprobs' tokens as "token_id:N"
    include_stop_str_in_output: bool = False
    prompt_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    return_token_ids: bool = False  # the prompt's and each choice's token ids beside the text
    truncate_prompt_tokens: Int32 | None = None  # keep the prompt's last k tokens (-1: max_model_len)
    # structured output: OpenAI's response_format and vLLM's guided_* extras
    response_format: ResponseFormat | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None


class CompletionRequest(SamplingFields):
    """POST /v1/completions"""

    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    add_special_tokens: bool = True  # vLLM's: the tokenizer's BOS (and the like) around a text prompt
    best_of: int | None = Field(default=None, ge=1, le=MAX_N)


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # tool_calls, name, ... reach the template

    role: Literal[ROLES]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions"""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Int32 | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    tools: list[dict[str, Any]] | None = None  # checked in router/tools.py
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None  # OpenAI's deprecated spelling of tools: refused by name
    function_call: str | dict[str, Any] | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    # vLLM's extras
    echo: bool = False  # the last message's content before the reply, when their roles match
    continue_final_message: bool = False  # the last message is continued (no generation prompt)
    add_special_tokens: bool = False  # the template writes BOS
    chat_template: str | None = None  # the request's own (needs --trust-request-chat-template)
