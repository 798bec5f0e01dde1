"""The LoRA shrink/expand kernels (engine/lora/triton_ops.py) under Triton's interpreter,
against the torch reference (engine/lora/ops.py). Run by test_kernels_interpreted.py in a
child process with `TRITON_INTERPRET=1` (see interpreted_kernels.py for why)."""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("run through test_kernels_interpreted.py (needs TRITON_INTERPRET=1)", allow_module_level=True)

pytest.importorskip("triton")

from baton.engine.lora.ops import add_lora_reference  # noqa: E402
from baton.engine.lora.triton_ops import add_lora_triton  # noqa: E402


def make_case(num_tokens: int, slots_per_token: list[int], d_in: int, widths: list[int], rank: int,
              ranks: dict[int, int], dtype: torch.dtype, seed: int = 0):
    """Slot buffers as the manager fills them: slot s holds an adapter of rank ranks[s]
    (zero past it), slot 0 stays zero; slots [T] repeats `slots_per_token` cyclically."""
    gen = torch.Generator().manual_seed(seed)
    num_slots = max(ranks) + 1
    a = torch.zeros(num_slots, len(widths) * rank, d_in)
    b = torch.zeros(num_slots, sum(widths), rank)
    offsets = [sum(widths[:i]) for i in range(len(widths))]
    for s, r in ranks.items():
        for i, (off, w) in enumerate(zip(offsets, widths)):
            a[s, i * rank : i * rank + r] = torch.randn(r, d_in, generator=gen) / d_in**0.5
            b[s, off : off + w, :r] = torch.randn(w, r, generator=gen) / r**0.5
    slots = torch.tensor([slots_per_token[t % len(slots_per_token)] for t in range(num_tokens)], dtype=torch.int32)
    x = torch.randn(num_tokens, d_in, generator=gen)
    y = torch.randn(num_tokens, sum(widths), generator=gen)
    return [t.to(dtype) for t in (x, y, a, b)] + [slots, offsets]


CASES = {
    # decode: few rows, every row another adapter or none, three slices (a fused Q/K/V)
    "decode-qkv": (7, [0, 1, 2, 3, 2, 0, 1], 48, [32, 16, 16], 16, {1: 8, 2: 16, 3: 4}),
    # prefill: long runs of one adapter, more than 64 rows (the larger tile), odd widths
    "prefill-gate-up": (150, [1] * 40 + [0] * 30 + [2] * 50 + [1] * 30, 40, [24, 24], 8, {1: 8, 2: 2}),
    # one slice wider than a tile, rank above one K tile
    "wide-down": (20, [2, 1], 32, [200], 80, {1: 80, 2: 33}),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_shrink_expand_equal_the_reference(name, dtype):
    x, y, a, b, slots, offsets = make_case(*CASES[name], dtype=dtype)
    rank = CASES[name][4]
    want = add_lora_reference(y.float().clone(), x.float(), a.float(), b.float(), slots, offsets, rank)
    got = add_lora_triton(y.clone(), x, a, b, slots, offsets, rank)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)
    base_rows = slots == 0
    assert torch.equal(got[base_rows], y[base_rows])  # rows without an adapter untouched
