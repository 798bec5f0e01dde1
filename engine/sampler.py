"""Turn one logits row per sequence into the next token, on the device the logits live on.

Order, as vLLM does it: raw log-probabilities (for `logprobs`) are taken from the model's
logits first; then per-request logits processors and constraints, `allowed_token_ids`,
`bad_words`, `logit_bias`, `min_tokens`
(stop tokens masked), repetition/presence/frequency penalties; then greedy rows take the argmax and
random rows apply temperature, top-k, top-p and min-p and draw with the exponential-race
trick (argmax of probs / Exp(1) noise), seeded per request where a seed is given.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from baton.engine.sequence import Sequence

# A logits transform edits rows of logits in place for the given sequences and returns the
# indices of rows whose request failed (with the message). Features such as guided decoding
# register one on the sampler.
LogitsTransform = Callable[[torch.Tensor, list[Sequence]], dict[int, str]]


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[float | None]  # raw logprob of each sampled token (None if not asked)
    top_logprobs: list[dict[int, float] | None]
    errors: dict[int, str] = field(default_factory=dict)  # row -> message: request fails


class Sampler:
    def __init__(self, device: torch.device, seed: int, eos_token_ids: list[int], pdl: bool = False):
        self.device = device
        self.pdl = pdl  # the engine's PDL setting, for the Triton argmax
        self.eos_token_ids = list(eos_token_ids)
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self.transforms: list[LogitsTransform] = [apply_logits_processors]

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampleResult:
        """logits [N, V] (any float dtype), one row per sequence -> one token per row."""
        want_logprobs = [s.params.logprobs is not None for s in seqs]
        token_ids, raw_logprobs, errors = self._choose(logits, seqs, any(want_logprobs))
        result_ids = token_ids.tolist()
        logprobs: list[float | None] = [None] * len(seqs)
        tops: list[dict[int, float] | None] = [None] * len(seqs)
        if raw_logprobs is not None:
            rows = [i for i, w in enumerate(want_logprobs) if w]
            k = max(seqs[i].params.logprobs for i in rows)
            sub = raw_logprobs[rows]
            chosen = sub.gather(1, token_ids[rows, None]).squeeze(1).tolist()
            top_vals, top_ids = (sub.topk(k, dim=-1) if k > 0 else (sub[:, :0], sub[:, :0].long()))
            top_vals, top_ids = top_vals.tolist(), top_ids.tolist()
            for j, i in enumerate(rows):
                n = seqs[i].params.logprobs
                entry = dict(zip(top_ids[j][:n], top_vals[j][:n]))
                entry[result_ids[i]] = chosen[j]
                logprobs[i] = chosen[j]
                tops[i] = entry
        return SampleResult(result_ids, logprobs, tops, errors)

    def sample_ids(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """The chosen token ids [N] on the logits' device, without waiting for them (no
        logprobs; transforms that report errors need `__call__`)."""
        if all(_plain_greedy(s) for s in seqs):
            # Nothing edits the logits: the argmax of the model's dtype is the argmax of its
            # exact float32 copy, without writing and reading that copy (33 MB at batch 64).
            if logits.is_cuda and logits.stride(-1) == 1:
                from baton.engine.fastpath.triton_ops import argmax_rows

                return argmax_rows(logits, pdl=self.pdl)
            return logits.argmax(dim=-1)
        return self._choose(logits, seqs, False)[0]

    def _choose(self, logits: torch.Tensor, seqs: list[Sequence], logprobs: bool):
        """(token ids on the device, raw log-probabilities if asked, row -> error)."""
        logits = logits.float()
        raw_logprobs = torch.log_softmax(logits, dim=-1) if logprobs else None
        errors: dict[int, str] = {}
        for transform in self.transforms:
            errors.update(transform(logits, seqs))
        apply_allowed_token_ids(logits, seqs)
        apply_bad_words(logits, seqs)
        apply_logit_bias(logits, seqs)
        self._mask_stop_tokens(logits, seqs)
        apply_penalties(logits, seqs)

        flags = [s.params.greedy for s in seqs]
        token_ids = logits.argmax(dim=-1)
        if not all(flags):  # decided on the host: no device sync before the caller's read
            sampled = self._sample(logits, seqs)
            token_ids = torch.where(_to_device(flags, torch.bool, logits.device), token_ids, sampled)
        return token_ids, raw_logprobs, errors

    def _mask_stop_tokens(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        for i, seq in enumerate(seqs):
            p = seq.params
            if seq.num_output_tokens < p.min_tokens:
                stop_ids = [t for t in p.all_stop_token_ids(self.eos_token_ids) if t < logits.shape[1]]
                if stop_ids:
                    row = logits[i]
                    masked = row.index_fill(0, torch.tensor(stop_ids, device=row.device), float("-inf"))
                    # A constraint applied before (a complete grammar) may allow only stop
                    # tokens: then they stay, rather than leaving nothing to sample.
                    logits[i] = torch.where(torch.isfinite(masked).any(), masked, row)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        temps = _to_device([max(s.params.temperature, 1e-5) for s in seqs], torch.float32, logits.device)
        logits = logits / temps[:, None]
        apply_top_k_top_p_min_p(logits, seqs)
        probs = torch.softmax(logits, dim=-1)
        noise = torch.empty_like(probs)
        seeded = [i for i, s in enumerate(seqs) if s.params.seed is not None]
        if len(seeded) < len(seqs):
            noise.exponential_(generator=self.generator)
        if seeded:
            rows = _to_device(seeded, torch.long, probs.device)
            noise[rows] = seeded_exponential(
                [seqs[i].params.seed for i in seeded],
                [seqs[i].num_output_tokens for i in seeded],
                probs.shape[1],
                probs.device,
            )
        return (probs / noise).argmax(dim=-1)


def _plain_greedy(seq: Sequence) -> bool:
    """Greedy, and no transform, stop-token mask or penalty would touch its logits row."""
    p = seq.params
    return (p.greedy and not p.logits_processors and p.guided_decoding is None and not p.has_penalties
            and not p.logit_bias and p.allowed_token_ids is None and not p.bad_words_token_ids
            and seq.num_output_tokens >= p.min_tokens)


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


_MIX1, _MIX2 = _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)
_GOLDEN, _STEP = _signed(0x9E3779B97F4A7C15), _signed(0xD1B54A32D192ED03)


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def seeded_exponential(seeds: list[int], steps: list[int], vocab: int, device: torch.device) -> torch.Tensor:
    """Exp(1) noise [len(seeds), vocab] that depends only on (seed, step, token id).

    A counter-based generator (SplitMix64's finaliser over seed, output position and token
    id, in int64 arithmetic that wraps identically on every device): a seeded request draws
    the same tokens whatever else is in the batch, and all seeded rows take one batched op
    instead of one generator call each.
    """
    seed_t = torch.tensor(seeds, dtype=torch.long).to(device, non_blocking=True)
    step_t = torch.tensor(steps, dtype=torch.long).to(device, non_blocking=True)
    x = seed_t[:, None] * _GOLDEN + step_t[:, None] * _STEP + torch.arange(vocab, device=device)[None, :]
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    x = x ^ _shr(x, 31)
    return -torch.log(bits_to_uniform(_shr(x, 41)))


def bits_to_uniform(bits: torch.Tensor) -> torch.Tensor:
    """23 random bits -> float32 strictly inside (0, 1).

    23, not 24: (2**24 - 0.5) rounds to 2**24 in float32, which would give a uniform of 1.0,
    zero noise, and 0/0 = NaN in the race for a token the grammar or top-k had removed.
    """
    return (bits.float() + 0.5) * (1.0 / (1 << 23))


def apply_logits_processors(logits: torch.Tensor, seqs: list[Sequence]) -> dict[int, str]:
    errors: dict[int, str] = {}
    for i, seq in enumerate(seqs):
        for processor in seq.params.logits_processors or ():
            try:
                row = processor(seq.output_token_ids, logits[i])
                if row is not logits[i]:
                    logits[i] = row
            except Exception as exc:  # a user callable: fail this request only
                errors[i] = f"logits processor {getattr(processor, '__name__', processor)!r} failed: {exc}"
                break
    return errors


def apply_allowed_token_ids(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """Rows of requests with `allowed_token_ids`: every other token's logit becomes -inf (ids
    past the vocabulary are skipped: the router refuses them)."""
    for i, seq in enumerate(seqs):
        allowed = seq.params.allowed_token_ids
        if allowed is None:
            continue
        keep = _to_device([t for t in allowed if t < logits.shape[1]], torch.long, logits.device)
        row = torch.full_like(logits[i], float("-inf"))
        row[keep] = logits[i, keep]
        logits[i] = row


def apply_bad_words(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """vLLM's `bad_words`: in each row, the last token of every banned sequence whose other
    tokens end the output so far gets -inf (a one-token word: always). Ids past the
    vocabulary are skipped."""
    for i, seq in enumerate(seqs):
        banned = seq.params.bad_words_token_ids
        if not banned:
            continue
        output = seq.output_token_ids
        ban = [ids[-1] for ids in banned
               if ids[-1] < logits.shape[1] and len(ids) - 1 <= len(output)
               and (len(ids) == 1 or output[len(output) - len(ids) + 1:] == ids[:-1])]
        if ban:
            logits[i, _to_device(ban, torch.long, logits.device)] = float("-inf")


def apply_logit_bias(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """Add each request's `logit_bias` to its row (ids past the vocabulary are skipped: the
    router refuses them), all rows in one scatter-add."""
    rows: list[int] = []
    ids: list[int] = []
    biases: list[float] = []
    for i, seq in enumerate(seqs):
        for token_id, bias in (seq.params.logit_bias or {}).items():
            if token_id < logits.shape[1]:
                rows.append(i)
                ids.append(token_id)
                biases.append(bias)
    if rows:
        dev = logits.device
        logits.index_put_((_to_device(rows, torch.long, dev), _to_device(ids, torch.long, dev)),
                          _to_device(biases, logits.dtype, dev), accumulate=True)


def _to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list as a device tensor, copied without waiting for the device."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """Repetition (prompt + output tokens) and presence/frequency (output tokens) penalties.

    All penalised rows at once: one scatter builds the "seen" mask and one the output-token
    counts, whatever the batch size.
    """
    vocab = logits.shape[1]
    rows: list[int] = []
    reps: list[float] = []
    pres: list[float] = []
    freqs: list[float] = []
    out_rows: list[int] = []
    out_ids: list[int] = []
    seen_rows: list[int] = []
    seen_ids: list[int] = []
    for i, seq in enumerate(seqs):
        p = seq.params
        if not p.has_penalties:
            continue
        j = len(rows)
        rows.append(i)
        reps.append(p.repetition_penalty)
        pres.append(p.presence_penalty)
        freqs.append(p.frequency_penalty)
        output = [t for t in seq.output_token_ids if t < vocab]
        out_rows += [j] * len(output)
        out_ids += output
        if p.repetition_penalty != 1.0:
            seen = [t for t in seq.prompt_token_ids if t < vocab] + output
            seen_rows += [j] * len(seen)
            seen_ids += seen
    if not rows:
        return
    dev = logits.device
    index = _to_device(rows, torch.long, dev)
    sub = logits[index]
    seen_mask = torch.zeros(sub.shape, dtype=torch.bool, device=dev)
    seen_mask[_to_device(seen_rows, torch.long, dev), _to_device(seen_ids, torch.long, dev)] = True
    rep = _to_device(reps, torch.float32, dev)[:, None]
    sub = torch.where(seen_mask, torch.where(sub > 0, sub / rep, sub * rep), sub)
    counts = torch.zeros(sub.shape, dtype=sub.dtype, device=dev)
    out_r, out_t = _to_device(out_rows, torch.long, dev), _to_device(out_ids, torch.long, dev)
    counts.index_put_((out_r, out_t), torch.ones(len(out_ids), dtype=sub.dtype, device=dev), accumulate=True)
    freq_t = _to_device(freqs, torch.float32, dev)[:, None]
    pres_t = _to_device(pres, torch.float32, dev)[:, None]
    sub -= freq_t * counts + pres_t * (counts > 0).float()
    logits[index] = sub


def apply_top_k_top_p_min_p(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """Filter temperature-scaled logits in place: top-k, then top-p, then min-p."""
    ks = [s.params.top_k for s in seqs]
    ps = [s.params.top_p for s in seqs]
    mins = [s.params.min_p for s in seqs]
    vocab = logits.shape[1]
    if any(0 < k < vocab for k in ks) or any(p < 1.0 for p in ps):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab, device=logits.device)[None, :]
        k_t = _to_device([k if 0 < k < vocab else vocab for k in ks], torch.long, logits.device)
        drop = ranks >= k_t[:, None]
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        probs = torch.softmax(sorted_logits, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of strictly better tokens
        p_t = _to_device(ps, torch.float32, logits.device)
        drop |= before > p_t[:, None]
        drop[:, 0] = False  # always keep the best token
        logits.scatter_(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    if any(m > 0.0 for m in mins):
        probs = torch.softmax(logits, dim=-1)
        m_t = _to_device(mins, torch.float32, logits.device)
        threshold = probs.max(dim=-1, keepdim=True).values * m_t[:, None]
        logits.masked_fill_(probs < threshold, float("-inf"))


def prompt_logprobs(logits: torch.Tensor, next_ids: list[int], k: int) -> list[dict[int, float]]:
    """For each prompt position: the logprob of the actual next token and the top k."""
    raw = torch.log_softmax(logits.float(), dim=-1)
    ids = torch.tensor(next_ids, device=logits.device)
    chosen = raw.gather(1, ids[:, None]).squeeze(1).tolist()
    entries: list[dict[int, float]] = []
    if k > 0:
        vals, idx = raw.topk(k, dim=-1)
        vals, idx = vals.tolist(), idx.tolist()
    for j, tok in enumerate(next_ids):
        entry = dict(zip(idx[j], vals[j])) if k > 0 else {}
        entry[tok] = chosen[j]
        entries.append(entry)
    return entries
