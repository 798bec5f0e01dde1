"""Request fields OpenAI or vLLM define that Baton does not implement: refused by name.

A field in `REFUSED` is a 400 whose `param` names it when it is set to anything but null or
its no-op value (the value that asks for nothing: `store: false`, `modalities: ["text"]`,
`use_beam_search: false`), so that clients sending defaults still work and no request
gets an output that silently differs from what it asked for. Fields Baton implements are
typed in `router/protocol.py`; a name neither knows is ignored, as OpenAI does.
docs/quickstart.md lists both.
"""

from __future__ import annotations

from typing import Any

from baton.router.errors import bad_request

_ANY = object()  # no value but null is a no-op

# field -> its no-op value (or _ANY), on both completions and chat
_COMMON: dict[str, Any] = {
    "service_tier": ("auto", "default"),
    "store": False,
    "metadata": {},  # metadata of stored completions: nothing is stored
    "prompt_cache_key": _ANY,
    # vLLM's extras
    "use_beam_search": False,
    "length_penalty": 1.0,
    "logits_processors": _ANY,
    "guided_decoding_backend": _ANY,
    "guided_whitespace_pattern": _ANY,
    "structured_outputs": _ANY,
    "priority": 0,
    "cache_salt": _ANY,
    "kv_transfer_params": _ANY,
    "vllm_xargs": _ANY,
}

_COMPLETIONS: dict[str, Any] = {
    "suffix": "",
    "prompt_embeds": _ANY,
}

_CHAT: dict[str, Any] = {
    "modalities": (["text"],),
    "audio": _ANY,
    "prediction": _ANY,
    "reasoning_effort": _ANY,
    "verbosity": _ANY,
    "web_search_options": _ANY,
    # vLLM's extras
    "documents": _ANY,
    "mm_processor_kwargs": _ANY,
}


def refused(chat: bool) -> dict[str, Any]:
    """The refused fields of one endpoint, each with its no-op value (`_ANY`: only null)."""
    return {**_COMMON, **(_CHAT if chat else _COMPLETIONS)}


def _no_op(value: Any, allowed: Any) -> bool:
    if value is None:
        return True
    if allowed is _ANY:
        return False
    options = allowed if isinstance(allowed, tuple) else (allowed,)
    # false is not 0 here: a bool field takes only bools
    return any(value == option and isinstance(value, bool) == isinstance(option, bool) for option in options)


def refuse_unimplemented(extra: dict[str, Any], chat: bool) -> None:
    """400 naming the first refused field that `extra` (the request's fields that
    `router/protocol.py` does not type) sets to more than a no-op."""
    for name, allowed in refused(chat).items():
        if name in extra and not _no_op(extra[name], allowed):
            raise bad_request(f"{name} is not supported by Baton (got {extra[name]!r}); leave it out "
                              "(docs/quickstart.md lists the request fields Baton implements)", name)
