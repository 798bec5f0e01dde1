"""`LoRARequest`: which adapter a request runs with (vLLM's class, plain data, no torch)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    """A PEFT LoRA adapter for one request.

    `lora_name`: what users call it (the serving `model` field); `lora_int_id`: its identity
    in this engine (>= 1; one id is one adapter: another path under a known id is refused);
    `lora_local_path`: a directory holding `adapter_config.json` and
    `adapter_model.safetensors`. Requests with equal ids share the adapter's weights and
    its prefix-cache blocks.
    """

    lora_name: str
    lora_int_id: int
    lora_local_path: str

    def __post_init__(self) -> None:
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise ValueError("LoRARequest.lora_name must be a non-empty string")
        if isinstance(self.lora_int_id, bool) or not isinstance(self.lora_int_id, int) or self.lora_int_id < 1:
            raise ValueError(f"LoRARequest.lora_int_id must be an integer >= 1, got {self.lora_int_id!r}")
        if not isinstance(self.lora_local_path, str) or not self.lora_local_path:
            raise ValueError("LoRARequest.lora_local_path must be a non-empty path")
