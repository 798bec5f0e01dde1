"""Converting between Python objects and the worker API's protobuf messages (no torch).

The router and the workers both use these, so a field added to `SamplingParams` travels
by changing this file and `baton/protos/worker.proto` only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any

from baton.protos import common_pb2, worker_pb2
from baton.sampling_params import GuidedDecodingParams, SamplingParams

# -- sampling parameters ---------------------------------------------------------------


def guided_to_json(guided: GuidedDecodingParams | None) -> str:
    if guided is None:
        return ""
    return json.dumps({guided.kind: getattr(guided, guided.kind)})


def guided_from_json(text: str) -> GuidedDecodingParams | None:
    """Inverse of `guided_to_json`; raises ValueError for anything else."""
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"guided_decoding_json is not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ValueError("guided_decoding_json must be a JSON object")
    unknown = set(value) - {f.name for f in fields(GuidedDecodingParams)}
    if unknown:
        raise ValueError(f"guided_decoding_json has unknown keys {sorted(unknown)}")
    return GuidedDecodingParams(**value)


def params_to_proto(p: SamplingParams) -> worker_pb2.SamplingParams:
    """One output's parameters (the router fans n out, so `p.n` must be 1)."""
    if p.num_candidates != 1:
        raise ValueError("the worker API carries one output per request (n=1, no best_of)")
    if p.logits_processors:
        raise ValueError("logits processors are Python callables and cannot be sent to a worker")
    msg = worker_pb2.SamplingParams(
        temperature=p.temperature,
        top_p=p.top_p,
        top_k=p.top_k,
        min_p=p.min_p,
        presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty,
        repetition_penalty=p.repetition_penalty,
        stop=list(p.stop),
        stop_token_ids=list(p.stop_token_ids),
        ignore_eos=p.ignore_eos,
        min_tokens=p.min_tokens,
        skip_special_tokens=p.skip_special_tokens,
        include_stop_str_in_output=p.include_stop_str_in_output,
        guided_decoding_json=guided_to_json(p.guided_decoding),
        logit_bias=p.logit_bias or {},
        allowed_token_ids=p.allowed_token_ids or [],
        bad_words=p.bad_words or [],
    )
    if p.seed is not None:
        msg.seed = p.seed
    if p.max_tokens is not None:
        msg.max_tokens = p.max_tokens
    if p.logprobs is not None:
        msg.logprobs = p.logprobs
    if p.prompt_logprobs is not None:
        msg.prompt_logprobs = p.prompt_logprobs
    if not p.detokenize:
        msg.detokenize = False
    if not p.spaces_between_special_tokens:
        msg.spaces_between_special_tokens = False
    return msg


def params_from_proto(msg: worker_pb2.SamplingParams) -> SamplingParams:
    """Raises ValueError (from SamplingParams' own checks) for out-of-range values."""
    return SamplingParams(
        n=1,
        temperature=msg.temperature,
        top_p=msg.top_p,
        top_k=msg.top_k,
        min_p=msg.min_p,
        presence_penalty=msg.presence_penalty,
        frequency_penalty=msg.frequency_penalty,
        repetition_penalty=msg.repetition_penalty,
        seed=msg.seed if msg.HasField("seed") else None,
        stop=list(msg.stop),
        stop_token_ids=list(msg.stop_token_ids),
        ignore_eos=msg.ignore_eos,
        max_tokens=msg.max_tokens if msg.HasField("max_tokens") else None,
        min_tokens=msg.min_tokens,
        logprobs=msg.logprobs if msg.HasField("logprobs") else None,
        prompt_logprobs=msg.prompt_logprobs if msg.HasField("prompt_logprobs") else None,
        detokenize=msg.detokenize if msg.HasField("detokenize") else True,
        skip_special_tokens=msg.skip_special_tokens,
        spaces_between_special_tokens=(msg.spaces_between_special_tokens
                                       if msg.HasField("spaces_between_special_tokens") else True),
        include_stop_str_in_output=msg.include_stop_str_in_output,
        guided_decoding=guided_from_json(msg.guided_decoding_json),
        logit_bias=dict(msg.logit_bias) or None,
        allowed_token_ids=list(msg.allowed_token_ids) or None,
        bad_words=list(msg.bad_words) or None,
    )


# -- outputs -----------------------------------------------------------------------------


def logprobs_to_proto(entry: dict[int, float] | None) -> common_pb2.TokenLogprobs:
    entry = entry or {}
    return common_pb2.TokenLogprobs(token_ids=list(entry), logprobs=list(entry.values()))


def logprobs_from_proto(msg: common_pb2.TokenLogprobs) -> dict[int, float]:
    return dict(zip(msg.token_ids, msg.logprobs))


class ChunkWriter:
    """Turns one output's cumulative `CompletionOutput`s into delta `GenerateChunk`s.

    `completion` is duck-typed (baton.engine.outputs.CompletionOutput): token_ids, text,
    logprobs, finish_reason, stop_reason.
    """

    def __init__(self, num_prompt_tokens: int = 0):
        self.num_tokens = 0
        self.text_len = 0
        self.num_prompt_tokens = num_prompt_tokens
        self.prompt_logprobs_sent = False

    def chunk(self, completion: Any, num_cached_tokens: int = 0, error: str | None = None,
              prompt_logprobs: list | None = None) -> worker_pb2.GenerateChunk | None:
        """The delta since the last call; None when nothing changed and it is not finished.

        `prompt_logprobs` (RequestOutput.prompt_logprobs, first entry None) go out once, in
        the first chunk that carries a token (the prompt is computed by then)."""
        tokens = completion.token_ids[self.num_tokens :]
        text = completion.text[self.text_len :] if len(completion.text) > self.text_len else ""
        finish = completion.finish_reason or ""
        if not tokens and not text and not finish:
            return None
        msg = worker_pb2.GenerateChunk(
            token_index=self.num_tokens,
            token_ids=tokens,
            text_index=self.text_len,
            text=text,
            finish_reason=finish,
            num_prompt_tokens=self.num_prompt_tokens,
            num_cached_tokens=num_cached_tokens,
            error=error or "",
        )
        if prompt_logprobs is not None and tokens and not self.prompt_logprobs_sent:
            self.prompt_logprobs_sent = True
            msg.prompt_logprobs.extend(logprobs_to_proto(e) for e in prompt_logprobs[1:])
        if completion.logprobs is not None:
            new = completion.logprobs[self.num_tokens : self.num_tokens + len(tokens)]
            msg.logprobs.extend(logprobs_to_proto(e) for e in new)
        stop = completion.stop_reason
        if isinstance(stop, str):
            msg.stop_string = stop
        elif isinstance(stop, int):
            msg.stop_token_id = stop
        self.num_tokens += len(tokens)
        self.text_len += len(text)
        return msg


@dataclass
class OutputState:
    """The receiving side of a stream of chunks: the whole output so far, de-duplicated.

    `apply` keeps only what lies beyond what it already has, by token and text offset, so a
    decode stream that repeats the first token (already taken from prefill) adds nothing twice.
    """

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None
    # The prompt's logprobs, first position None (the engine's RequestOutput.prompt_logprobs);
    # None unless asked for.
    prompt_logprobs: list[dict[int, float] | None] | None = None

    def apply(self, chunk: worker_pb2.GenerateChunk) -> tuple[int, int]:
        """Merge a chunk; returns (number of new tokens, number of new text characters)."""
        skip = len(self.token_ids) - chunk.token_index
        if skip < 0:
            raise ValueError(f"chunk starts at token {chunk.token_index}, have {len(self.token_ids)}")
        new_tokens = list(chunk.token_ids[skip:])
        self.token_ids.extend(new_tokens)
        if chunk.logprobs:
            self.logprobs.extend(logprobs_from_proto(m) for m in chunk.logprobs[skip:])
        text_skip = len(self.text) - chunk.text_index
        if text_skip < 0:
            raise ValueError(f"chunk starts at character {chunk.text_index}, have {len(self.text)}")
        new_text = chunk.text[text_skip:]
        self.text += new_text
        if chunk.num_prompt_tokens:
            self.num_prompt_tokens = chunk.num_prompt_tokens
        if chunk.prompt_logprobs and self.prompt_logprobs is None:
            self.prompt_logprobs = [None] + [logprobs_from_proto(m) for m in chunk.prompt_logprobs]
        if chunk.num_cached_tokens:
            self.num_cached_tokens = max(self.num_cached_tokens, chunk.num_cached_tokens)
        if chunk.finish_reason:
            self.finish_reason = chunk.finish_reason
            which = chunk.WhichOneof("stop_reason")
            self.stop_reason = getattr(chunk, which) if which else None
            self.error = chunk.error or None
        return len(new_tokens), len(new_text)
