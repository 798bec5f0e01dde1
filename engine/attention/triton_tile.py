"""One online-softmax step over a tile of paged keys, shared by the decode and prefill kernels."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def attend_tile(q, k_ptr, v_ptr, bt_row, kvh, n0, q_pos, seq_len, d, d_mask, m_i, l_i, acc, qk_scale,
                stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, BOUNDED: tl.constexpr,
                PRECISION: tl.constexpr):
    """Keys n0..n0+BLOCK_N of one KV head, gathered through the block table row `bt_row`.

    q [ROWS, D_PAD]; m_i, l_i [ROWS] and acc [ROWS, D_PAD] are the running max (base 2), sum
    and weighted values. CAUSAL hides keys after each row's position `q_pos`; BOUNDED hides
    keys at or after `seq_len` (a tile that runs past the end). Returns the new m, l, acc.
    """
    n = n0 + tl.arange(0, BLOCK_N)
    n_mask = n < seq_len
    page = tl.load(bt_row + n // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
    slot = n % BLOCK_SIZE
    kv_mask = n_mask[:, None] & d_mask[None, :]
    k = tl.load(k_ptr + (page * stride_kb + slot * stride_kt + kvh * stride_kh)[:, None] + d[None, :],
                mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + (page * stride_vb + slot * stride_vt + kvh * stride_vh)[:, None] + d[None, :],
                mask=kv_mask, other=0.0)
    qk = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PRECISION) * qk_scale
    if CAUSAL:
        qk = tl.where((n[None, :] <= q_pos[:, None]) & n_mask[None, :], qk, float("-inf"))
    elif BOUNDED:
        qk = tl.where(n_mask[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    # Rows whose every key so far is masked keep m = -inf; keep their arithmetic finite.
    m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(qk - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=PRECISION)
    return m_new, l_i, acc
