"""The batched LoRA product: y[t] += B[s_t] (A[s_t] x[t]) for each token t of a step, with
s_t the GPU slot of its request's adapter (slot 0: none, all zeros).

Shapes, per (fused) projection with `n` slices and rank bound R (`max_lora_rank`):
x [T, in], y [T, out], A [S + 1, n R, in] (slice i's A in rows i R .. i R + r), B [S + 1,
out, R] (slice i's B, scaling folded in, in rows offsets[i] .. offsets[i] + width_i, its
columns past the adapter's rank zero), slots [T] int. An adapter of rank r < R is
zero-padded, so adapters of any rank mix in one product.

`add_lora` picks the implementation: the Triton kernels on CUDA (`triton_ops.py`: shrink
then expand, segment-gathered, no host sync, so CUDA graphs capture them) and the torch
reference elsewhere (`add_lora_reference`).
"""

from __future__ import annotations

import torch


def add_lora_reference(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slots: torch.Tensor,
                       offsets: list[int], rank: int) -> torch.Tensor:
    """y += the adapters' products, in place; returns y. One shrink and one expand per
    distinct adapter of the step (the rows of each gathered), in torch: it reads the slot
    ids on the host, so it is for eager steps only."""
    widths = [end - start for start, end in zip(offsets, offsets[1:] + [y.shape[1]])]
    for s in torch.unique(slots).tolist():
        if s == 0:
            continue
        rows = (slots == s).nonzero().squeeze(1)
        u = x[rows] @ a[s].T  # [t, n R]
        delta = torch.cat([u[:, i * rank : (i + 1) * rank] @ b[s, off : off + w].T
                           for i, (off, w) in enumerate(zip(offsets, widths))], dim=1)  # [t, out]
        y.index_put_((rows,), delta.to(y.dtype), accumulate=True)
    return y


def add_lora(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slots: torch.Tensor,
             offsets: list[int], rank: int) -> torch.Tensor:
    """y [T, out] += B[slots] A[slots] x, in place (see the module docstring); returns y."""
    if y.is_cuda:
        from baton.engine.lora.triton_ops import add_lora_triton

        return add_lora_triton(y, x, a, b, slots, offsets, rank)
    return add_lora_reference(y, x, a, b, slots, offsets, rank)
