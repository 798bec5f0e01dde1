"""The batched LoRA product on CUDA: segment-gathered shrink and expand kernels (Triton).

`ops.py` states the shapes. Two steps per projection, in the manner of Punica's SGMV, both
launches of one kernel (`_slot_product_kernel`):
- shrink: u[t] = A[s_t] x[t], u [T, n R] (every slice's rank block at once: they share x);
- expand, once per slice i: y[t, slice i] += B[s_t, slice i] u[t, i R : (i + 1) R].
Each program takes a tile of token rows, a tile of output columns and one slot `s`, and
computes the rows of that tile whose token runs adapter `s` (the others are masked); a
program whose tile has no such row returns at once. Rows of one sequence are consecutive
and share a slot, so a prefill tile mostly belongs to one adapter and reads its weights
once; in a decode tile of mixed adapters each program still reads only its own adapter's
weights, the traffic the product needs anyway. Slot 0 (no adapter) launches no program.

Nothing reads the slots on the host and the grid depends only on T and the buffer shapes,
so CUDA graphs capture these launches and replay them with any adapters in the slots.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _slot_product_kernel(in_ptr, w_ptr, slots_ptr, out_ptr, T, K, N, stride_im, stride_ws, stride_wn, stride_om,
                         ACCUMULATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr):
    """out[t, n] (+)= sum_k in[t, k] w[s, n, k] for the rows t of this tile with slots[t] == s
    (s: this program's slot): the shrink (in = x, w = A, out = u) and, with ACCUMULATE,
    the expand (in = u, w = B, out = y)."""
    pid_m, pid_n, slot = tl.program_id(0), tl.program_id(1), tl.program_id(2) + 1
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slots = tl.load(slots_ptr + rows, mask=rows < T, other=0)
    mine = (slots == slot) & (rows < T)
    if tl.sum(mine.to(tl.int32), axis=0) == 0:
        return
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(in_ptr + rows[:, None] * stride_im + ks[None, :], mask=mine[:, None] & (ks[None, :] < K),
                    other=0.0)
        w = tl.load(w_ptr + slot * stride_ws + cols[None, :] * stride_wn + ks[:, None],
                    mask=(cols[None, :] < N) & (ks[:, None] < K), other=0.0)  # [BLOCK_K, BLOCK_N]
        acc += tl.dot(x.to(w.dtype), w)
    mask = mine[:, None] & (cols[None, :] < N)
    out = out_ptr + rows[:, None] * stride_om + cols[None, :]
    if ACCUMULATE:
        acc += tl.load(out, mask=mask, other=0.0).to(tl.float32)
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _block(n: int, low: int, high: int) -> int:
    return max(low, min(high, triton.next_power_of_2(n)))


def add_lora_triton(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slots: torch.Tensor,
                    offsets: list[int], rank: int) -> torch.Tensor:
    """`ops.add_lora` on the GPU (or under TRITON_INTERPRET): y += B[slots] A[slots] x in
    place; returns y. x [T, in] and y [T, out] with unit column stride; a and b contiguous."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    T, K = x.shape
    num_slots = a.shape[0] - 1
    if T == 0 or num_slots == 0:
        return y
    N = a.shape[1]  # n R
    u = torch.empty(T, N, dtype=x.dtype, device=x.device)
    block_m = 16 if T <= 64 else 64
    bn = _block(N, 16, 64)
    _slot_product_kernel[(triton.cdiv(T, block_m), triton.cdiv(N, bn), num_slots)](
        x, a, slots, u, T, K, N, x.stride(0), a.stride(0), a.stride(1), u.stride(0),
        ACCUMULATE=False, BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=64)
    widths = [end - start for start, end in zip(offsets, offsets[1:] + [y.shape[1]])]
    bk = _block(rank, 16, 64)
    for i, (off, width) in enumerate(zip(offsets, widths)):
        bn = _block(width, 16, 128)
        u_i, b_i, y_i = u[:, i * rank : (i + 1) * rank], b[:, off : off + width], y[:, off : off + width]
        _slot_product_kernel[(triton.cdiv(T, block_m), triton.cdiv(width, bn), num_slots)](
            u_i, b_i, slots, y_i, T, rank, width, u_i.stride(0), b_i.stride(0), b_i.stride(1), y_i.stride(0),
            ACCUMULATE=True, BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk)
    return y
