"""vLLM's `POST /tokenize` and `POST /detokenize`, answered by the router's own tokenizer.

Request and response shapes are vLLM's. `/tokenize` takes either a completions-style
`prompt` or a chat-style `messages` list (rendered by the model's chat template, as a chat
request would be); it answers `{"count", "max_model_len", "tokens", "token_strs"}`
(`token_strs`, the vocabulary's spelling of each token, only with `return_token_strs`).
`/detokenize` takes `{"tokens": [...]}` and answers `{"prompt": text}` (special tokens kept,
as vLLM decodes). `GET /tokenizer_info` gives the special tokens and the chat template.
`model` is optional; a name that is not served is a 404. Like vLLM, they sit outside `/v1`, so `--api-key` does not cover them. No worker is needed: `max_model_len` is
what the workers report, or null while none is known.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Body
from fastapi.exceptions import RequestValidationError
from pydantic import Field, ValidationError

from baton.router.edge import JSONRoute
from baton.router.errors import bad_request, model_not_found
from baton.router.params import chat_text, check_request_template, prompt_error
from baton.router.protocol import ChatMessage, TextBody, TokenId, _Body
from baton.tokenizer import Tokenizer


class _TokenizeBody(TextBody):
    model: str | None = Field(default=None, max_length=512)
    return_token_strs: bool = False


class TokenizeCompletionRequest(_TokenizeBody):
    prompt: str
    add_special_tokens: bool = True


class TokenizeChatRequest(_TokenizeBody):
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False  # as in a chat request (router/params.py:chat_options)
    # The chat template writes BOS itself, so none is added by default (vLLM's default).
    add_special_tokens: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    chat_template: str | None = None  # the request's own, as in a chat request (needs the server's trust)
    tools: list[dict[str, Any]] | None = None  # rendered by the template, as in a chat request


_TokenizeJSON = Annotated[dict[str, Any], Body(description="a TokenizeCompletionRequest ({prompt, ...}) "
                                                           "or a TokenizeChatRequest ({messages, ...})")]


class DetokenizeRequest(_Body):
    model: str | None = Field(default=None, max_length=512)
    tokens: list[TokenId]


def tokenization_routes(tokenizer: Tokenizer, served: tuple[str, ...],
                        limits: Callable[[], tuple[int, int] | None],
                        trust_request_chat_template: bool = False) -> APIRouter:
    """The routes; `limits()` is (max_model_len, vocab_size) of the workers, or None. A
    request's own `chat_template` is rendered only when the server trusts such templates."""
    router = APIRouter(tags=["vllm"], route_class=JSONRoute)

    def check_model(name: str | None) -> None:
        if name is not None and name not in served:
            raise model_not_found(name, list(served))

    async def off_loop(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    @router.post("/tokenize")
    async def tokenize(raw: _TokenizeJSON) -> dict:
        # The form is chosen by its key, so a bad field's error names the field itself.
        kind = TokenizeChatRequest if "messages" in raw else TokenizeCompletionRequest
        try:
            body = kind.model_validate(raw)
        except ValidationError as exc:
            raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None
        check_model(body.model)
        if isinstance(body, TokenizeChatRequest):
            await off_loop(check_request_template, body, trust_request_chat_template)
            text, param = await off_loop(chat_text, body, tokenizer), "messages"
        else:
            text, param = body.prompt, "prompt"
        try:
            ids = await off_loop(tokenizer.encode, text, body.add_special_tokens)
        except ValueError as exc:
            raise prompt_error(exc, param, 0) from None
        known = limits()
        return {"count": len(ids), "max_model_len": known[0] if known else None, "tokens": ids,
                "token_strs": [tokenizer.id_to_token(t) for t in ids] if body.return_token_strs else None}

    @router.get("/tokenizer_info")
    async def tokenizer_info() -> dict:
        # vLLM's (behind its --enable-tokenizer-info-endpoint): what a client needs to
        # tokenise and template as the server does (lm-eval's remote tokenizer reads it).
        known = limits()
        return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tokenizer.bos_token,
                "eos_token": tokenizer.eos_token, "pad_token": tokenizer.pad_token,
                "chat_template": tokenizer.chat_template,
                "model_max_length": known[0] if known else None}

    @router.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        check_model(body.model)
        vocab = tokenizer.vocab_size
        bad = next((t for t in body.tokens if t >= vocab), None)
        if bad is not None:
            raise bad_request(f"token id {bad} is out of range: the vocabulary has {vocab} tokens", "tokens")
        return {"prompt": await off_loop(tokenizer.decode, body.tokens, False)}

    return router
