"""`LLM`: offline batch generation, vLLM's entry point for scripts and notebooks."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from baton.engine.config import EngineArgs
from baton.engine.llm_engine import LLMEngine, PromptType
from baton.engine.lora.request import LoRARequest
from baton.engine.outputs import EmbeddingRequestOutput, RequestOutput
from baton.sampling_params import PoolingParams, SamplingParams


class LLM:
    """`LLM(model=..., dtype=..., device=..., **engine_args)`; `generate(prompts, params)`."""

    def __init__(self, model: str | None = None, **kwargs: Any):
        self._start(EngineArgs.from_kwargs(model=model, **kwargs))

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs) -> LLM:
        """An `LLM` over an engine built from `engine_args` (as `LLM(**fields)`)."""
        if not isinstance(engine_args, EngineArgs):
            raise TypeError(f"from_engine_args takes an EngineArgs, got {type(engine_args).__name__}")
        llm = cls.__new__(cls)
        llm._start(engine_args)
        return llm

    def _start(self, engine_args: EngineArgs) -> None:
        self.engine = LLMEngine.from_engine_args(engine_args)
        self.engine.stream_outputs = False  # generate() only needs each request's final output
        self._counter = 0

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in the prompts' order.
        `lora_request`: one adapter for every prompt, or a list matching the prompts (None
        items: the base model); the engine needs `enable_lora=True`. The adapters are read
        while the other prompts run; a prompt whose adapter cannot be used comes back with
        finish_reason "error" and the reason in `error` (the others are unaffected)."""
        return self._run(prompts, sampling_params, SamplingParams, use_tqdm, lora_request)

    def embed(
        self,
        prompts: PromptType | Sequence[PromptType],
        pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
        use_tqdm: bool | None = None,
    ) -> list[EmbeddingRequestOutput]:
        """One embedding per prompt (`outputs.embedding`), in the prompts' order; the engine
        must run with task="embed" (engine/pooling.py says how it pools)."""
        return self._run(prompts, pooling_params, PoolingParams, use_tqdm)

    def _run(self, prompts, given, kind, use_tqdm, lora_request=None):
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if given is None or isinstance(given, kind):
            params = [given or kind()] * len(prompts)
        else:
            params = list(given)
            if len(params) != len(prompts):
                raise ValueError(f"{len(params)} parameters for {len(prompts)} prompts")
        if lora_request is None or isinstance(lora_request, LoRARequest):
            loras = [lora_request] * len(prompts)
        else:
            loras = list(lora_request)
            if len(loras) != len(prompts):
                raise ValueError(f"{len(loras)} LoRA requests for {len(prompts)} prompts")
        ids = []
        try:
            for prompt, p, lora in zip(prompts, params, loras):
                rid = str(self._counter)
                self._counter += 1
                self.engine.add_request(rid, prompt, p, lora_request=lora)
                ids.append(rid)
        except BaseException:  # a bad prompt or parameters, an adapter id clash: queue none of them
            self.engine.abort_request(ids)
            raise
        show = sys.stderr.isatty() if use_tqdm is None else use_tqdm
        bar = None
        if show and len(prompts) > 1:
            from tqdm import tqdm

            bar = tqdm(total=len(prompts), desc="generating", unit="req")
        finished: dict[str, RequestOutput | EmbeddingRequestOutput] = {}
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        finished[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            self.engine.abort_request(ids)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [finished[rid] for rid in ids]
