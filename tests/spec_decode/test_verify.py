"""Verification keeps the target distribution: many draws on a tiny vocabulary, chi-square.

Every draw is seeded (the engine generator's seed, or per-request seeds), so the statistics
are the same on every run: these tests cannot flake.
"""

from __future__ import annotations

import pytest
import torch

from baton.engine.sampler import Sampler
from baton.engine.sequence import Sequence
from baton.engine.spec_decode.verify import verify
from baton.sampling_params import SamplingParams

P0 = torch.tensor([0.05, 0.30, 0.10, 0.25, 0.20, 0.10])  # the target's next token
P1 = torch.tensor([0.40, 0.05, 0.15, 0.10, 0.10, 0.20])  # and the one after token 3
N = 6000
# Chi-square with 5 degrees of freedom: P(X > 25.7) = 1e-4 under the right distribution,
# while a sampler that ignored the target (uniform) or the drafts (always emitting them)
# scores in the hundreds or more here.
CRITICAL = 25.7


def chi_square(samples: list[int], p: torch.Tensor) -> float:
    observed = torch.bincount(torch.tensor(samples), minlength=len(p)).double()
    expected = p.double() * len(samples)
    return float(((observed - expected) ** 2 / expected).sum())


def verify_many(drafts: list[int], seeded: bool, n: int = N):
    seqs = []
    for i in range(n):
        params = SamplingParams(temperature=1.0, seed=i if seeded else None)
        seq = Sequence(f"r{i}", 0, [0, 1, 2], params, 0.0)
        seq.spec_token_ids = list(drafts)
        seqs.append(seq)
    rows = [P0.log(), P1.log(), P1.log()][: 1 + len(drafts)]
    logits = torch.stack(rows).repeat(n, 1)
    row_seqs = [i for i in range(n) for _ in rows]
    return verify(Sampler(torch.device("cpu"), 1234, eos_token_ids=[]), logits, seqs, row_seqs)


@pytest.mark.parametrize("seeded", [False, True])
@pytest.mark.parametrize("draft", [3, 0, 5])  # likely, unlikely, and a mid token
def test_emitted_tokens_follow_the_target_whatever_the_draft(seeded, draft):
    results = verify_many([draft, 3], seeded)
    first = [v.tokens[0][0] for v in results.values()]
    assert chi_square(first, P0) < CRITICAL
    # The first draft is accepted exactly when the target drew it: about p0(draft) of the time.
    accepted = [v for v in results.values() if v.num_accepted >= 1]
    assert abs(len(accepted) / N - float(P0[draft])) < 0.02
    # After an accepted draft the next token follows the target's next distribution.
    second = [v.tokens[1][0] for v in accepted]
    if len(second) > 1000:
        assert chi_square(second, P1) < CRITICAL


def test_a_sampler_that_always_took_the_draft_would_fail_the_test():
    # The test's power: emitting the draft whenever offered is far from P0.
    assert chi_square([3] * N, P0) > 100 * CRITICAL


def test_greedy_rows_accept_while_the_argmax_matches():
    seq = Sequence("g", 0, [0, 1, 2], SamplingParams(temperature=0.0), 0.0)
    seq.spec_token_ids = [1, 0, 4]  # argmax of P0 is 1, of P1 is 0; the third draft is wrong
    logits = torch.stack([P0.log(), P1.log(), P1.log(), P0.log()])
    result = verify(Sampler(torch.device("cpu"), 0, eos_token_ids=[]), logits, [seq], [0, 0, 0, 0])[0]
    assert [t for t, _, _ in result.tokens] == [1, 0, 0] and result.num_accepted == 2
