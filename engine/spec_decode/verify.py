"""Verify drafted tokens against the target model's distributions: keep the longest agreeing
prefix, then one more token from the target.

A sequence that drafted `d_1..d_k` gets `k + 1` rows of target logits from one forward: row
`j` is the distribution of the token after `token_ids + d_1..d_j`. Each row is sampled
exactly as a plain decode step would sample that position (`Sampler` on a view of the
sequence with the drafts so far appended: penalties, `min_tokens`, logits processors, the
grammar's mask and a seeded request's noise all see that history), giving `t_j`. The drafts
are accepted while `d_{j+1} == t_j`; the step emits `t_0..t_a` (`a` accepted drafts, then
the target's own token at the first disagreement, or the bonus token after all k).

Why this preserves the target distribution: every draft here is a point mass (n-gram
lookup, and the draft model's argmax). Rejection sampling with a point-mass draft `d`
accepts with probability `min(1, p(d) / 1) = p(d)` and otherwise samples from
`max(0, p - q)` normalised, i.e. `p` without `d`. Comparing `d` with an exact sample `t ~ p`
does the same: `P(t == d) = p(d)`, and given `t != d`, `t` is distributed as `p` without
`d`. Greedy rows (argmax) accept while the argmax matches. And because `t_j` is drawn with
the noise a plain step would use at that output position, a seeded request emits the same
tokens with and without speculation.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from baton.engine.sequence import Sequence


@dataclass
class Verified:
    """One sequence's verification: the emitted (token id, logprob, top logprobs) in order
    (the accepted drafts, then the target's own token) and the number of drafts it checked;
    `error`: the request must fail."""

    tokens: list[tuple[int, float | None, dict[int, float] | None]]
    num_drafts: int
    error: str | None = None

    @property
    def num_accepted(self) -> int:
        return max(0, len(self.tokens) - 1)


def draft_views(seq: Sequence, drafts: list[int]) -> list[Sequence]:
    """`1 + len(drafts)` sampling views of `seq`: view j has `drafts[:j]` appended (and its
    grammar advanced over them). Stops early where the grammar refuses a draft (that draft
    can never be accepted: the target's row before it is masked) or ends (nothing follows)."""
    views = [seq]
    matcher = seq.grammar_matcher
    for j, token in enumerate(drafts):
        if matcher is not None:
            if matcher.is_terminated():
                break
            matcher = matcher.fork()
            if not matcher.accept_token(token):
                break
        view = copy.copy(seq)
        view.token_ids = seq.token_ids + drafts[: j + 1]
        view.grammar_matcher = None if matcher is not None and matcher.is_terminated() else matcher
        views.append(view)
    return views


def verify(sampler, logits: torch.Tensor, seqs: list[Sequence], row_seqs: list[int]) -> dict[int, Verified]:
    """Sample every row of `logits` [R, V] and accept drafts; `row_seqs[r]` is the batch index
    of row r. A sequence's rows are consecutive: one, or `1 + k` when it verifies
    its first k `spec_token_ids`. Returns batch index -> `Verified`."""
    groups: list[tuple[int, int, int]] = []  # (batch index, first row, rows)
    r = 0
    while r < len(row_seqs):
        i, end = row_seqs[r], r + 1
        while end < len(row_seqs) and row_seqs[end] == i:
            end += 1
        groups.append((i, r, end - r))
        r = end
    views: list[Sequence] = []
    keep: list[int] = []  # logits rows that are sampled (a grammar may cut a group short)
    used: list[int] = []  # rows of each group that are sampled
    for i, first, rows in groups:
        group_views = draft_views(seqs[i], seqs[i].spec_token_ids[: rows - 1])
        views += group_views
        keep += range(first, first + len(group_views))
        used.append(len(group_views))
    if len(keep) < logits.shape[0]:
        logits = logits[torch.tensor(keep, device=logits.device)]
    result = sampler(logits, views)
    out: dict[int, Verified] = {}
    row = 0
    for (i, _, rows), n in zip(groups, used):
        drafts = seqs[i].spec_token_ids[: rows - 1]
        tokens = []
        error = None
        for j in range(n):
            error = result.errors.get(row + j)
            if error is not None:
                break
            t = result.token_ids[row + j]
            tokens.append((t, result.logprobs[row + j], result.top_logprobs[row + j]))
            if j >= len(drafts) or t != drafts[j]:
                break
        out[i] = Verified(tokens, len(drafts), error)
        row += n
    return out


def verify_drafts(sampler, logits: torch.Tensor, seqs: list[Sequence], row_seqs: list[int], outputs) -> None:
    """`verify`, written into the step's outputs (`model_runner.StepOutput`, one per sequence)."""
    for i, v in verify(sampler, logits, seqs, row_seqs).items():
        out = outputs[i]
        out.num_drafts = v.num_drafts
        if v.error is not None:
            out.error = v.error
            continue
        (out.token_id, out.logprob, out.top_logprobs), *out.next_tokens = v.tokens
