"""Multi-LoRA: many PEFT adapters over one base model, mixed in one batch.

- `request.py`: `LoRARequest` (vLLM's), what a request names;
- `adapter.py`: reading a PEFT adapter directory into host memory, checked against the
  model's `LoRALayout` (which projections exist, their slices and widths);
- `manager.py`: `LoRAManager`, owned by the model runner: adapter reads on threads of
  their own, the host-memory LRU (`max_cpu_loras`), the GPU slots (`max_loras`, fixed-size buffers, so CUDA graphs see
  stable pointers), and each step's token -> slot index;
- `layers.py`: `LoRAProjection`, the `Projection` (engine/fastpath/projection.py) that
  wraps a model's projection and adds its adapters' product to it;
- `ops.py`: the batched product itself: a torch reference (CPU) and the Triton
  segment-gathered kernels (`triton_ops.py`, CUDA).

Only `LoRARequest` is imported here: the rest loads torch.
"""

from baton.engine.lora.request import LoRARequest

__all__ = ["LoRARequest"]
