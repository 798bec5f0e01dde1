"""Sampling on fixed logits: filters, penalties, seeds, stop-token masking."""

from __future__ import annotations

import math

import pytest
import torch

from baton.engine.sampler import Sampler, apply_penalties, apply_top_k_top_p_min_p
from baton.engine.sequence import Sequence
from baton.sampling_params import SamplingParams


def seq(params: SamplingParams, prompt=(5, 6), output=()) -> Sequence:
    s = Sequence("r", 0, list(prompt), params, 0.0)
    s.token_ids.extend(output)
    return s


def kept(logits: torch.Tensor) -> list[int]:
    return torch.nonzero(torch.isfinite(logits[0])).flatten().tolist()


LOGITS = torch.log(torch.tensor([[0.05, 0.4, 0.3, 0.15, 0.1]]))


def test_top_k_keeps_the_k_best():
    logits = LOGITS.clone()
    apply_top_k_top_p_min_p(logits, [seq(SamplingParams(top_k=2))])
    assert kept(logits) == [1, 2]


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = LOGITS.clone()
    apply_top_k_top_p_min_p(logits, [seq(SamplingParams(top_p=0.75))])
    assert kept(logits) == [1, 2, 3]  # 0.4 + 0.3 < 0.75 <= 0.4 + 0.3 + 0.15
    logits = LOGITS.clone()
    apply_top_k_top_p_min_p(logits, [seq(SamplingParams(top_p=0.01))])
    assert kept(logits) == [1]  # the best token always survives


def test_min_p_drops_tokens_below_a_share_of_the_best():
    logits = LOGITS.clone()
    apply_top_k_top_p_min_p(logits, [seq(SamplingParams(min_p=0.5))])
    assert kept(logits) == [1, 2]  # threshold 0.2


def test_logit_bias_moves_the_choice_of_its_row_only():
    sampler = Sampler(torch.device("cpu"), 0, eos_token_ids=[])
    logits = LOGITS.repeat(2, 1)
    biased = seq(SamplingParams(temperature=0.0, logit_bias={4: 100.0, 1: -100.0}))
    plain = seq(SamplingParams(temperature=0.0))
    assert sampler(logits, [biased, plain]).token_ids == [4, 1]
    assert sampler.sample_ids(logits, [biased, plain]).tolist() == [4, 1]


def test_allowed_token_ids_leave_only_those_tokens():
    sampler = Sampler(torch.device("cpu"), 0, eos_token_ids=[])
    logits = LOGITS.repeat(2, 1)
    limited = seq(SamplingParams(temperature=0.0, allowed_token_ids=[0, 3]))
    plain = seq(SamplingParams(temperature=0.0))
    assert sampler(logits, [limited, plain]).token_ids == [3, 1]
    sampled = seq(SamplingParams(temperature=1.0, allowed_token_ids=[0, 4]))
    assert {sampler(LOGITS.clone(), [sampled]).token_ids[0] for _ in range(20)} <= {0, 4}


def test_bad_words_ban_a_last_token_only_after_its_prefix():
    sampler = Sampler(torch.device("cpu"), 0, eos_token_ids=[])
    banned = [[1], [3, 2], [4, 3, 2]]  # token 1 always; 2 after 3; 2 after 4, 3

    def choice(output) -> int:
        row = seq(SamplingParams(temperature=0.0, bad_words=["x"]), output=output)
        row.params.bad_words_token_ids = banned
        return sampler(LOGITS.clone(), [row]).token_ids[0]

    assert choice(()) == 2  # 1 is banned; 2 follows no 3
    assert choice((3,)) == 3  # 1 and 2 banned: the next best
    assert choice((4, 2)) == 2  # the prefix must end the output
    assert choice((0, 4, 3)) == 3
    plain = seq(SamplingParams(temperature=0.0), output=(3,))
    assert sampler(LOGITS.clone(), [plain]).token_ids == [1]


def test_filters_apply_per_row():
    logits = LOGITS.repeat(2, 1)
    apply_top_k_top_p_min_p(logits, [seq(SamplingParams(top_k=1)), seq(SamplingParams())])
    assert torch.isfinite(logits[0]).sum() == 1 and torch.isfinite(logits[1]).all()


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0, 1.0]])
    apply_penalties(logits, [seq(SamplingParams(repetition_penalty=2.0), prompt=(0,), output=(1,))])
    assert logits.tolist() == [[1.0, -4.0, 2.0, -2.0, 1.0]]


def test_presence_and_frequency_penalties_count_output_tokens_only():
    logits = torch.zeros(1, 5)
    s = seq(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), prompt=(4,), output=(1, 1, 2))
    apply_penalties(logits, [s])
    assert logits.tolist() == [[0.0, -1.0, -0.75, 0.0, 0.0]]


def test_greedy_takes_argmax_and_reports_raw_logprobs():
    sampler = Sampler(torch.device("cpu"), 0, eos_token_ids=[])
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    result = sampler(logits.clone(), [seq(SamplingParams(temperature=0, logprobs=2))])
    raw = torch.log_softmax(logits, -1)[0]
    assert result.token_ids == [1]
    assert result.logprobs[0] == pytest.approx(raw[1].item())
    assert result.top_logprobs[0] == pytest.approx({1: raw[1].item(), 2: raw[2].item()})


def test_logprobs_are_from_the_raw_distribution_not_the_tempered_one():
    sampler = Sampler(torch.device("cpu"), 0, eos_token_ids=[])
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    result = sampler(logits.clone(), [seq(SamplingParams(temperature=0.3, top_k=1, logprobs=1))])
    assert result.token_ids == [3]
    assert result.logprobs[0] == pytest.approx(torch.log_softmax(logits, -1)[0, 3].item())


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch():
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=1.0, seed=42)

    def draw(batch_extra: int) -> list[int]:
        sampler = Sampler(torch.device("cpu"), seed=batch_extra, eos_token_ids=[])
        s = seq(params)
        others = [seq(SamplingParams(temperature=1.0)) for _ in range(batch_extra)]
        tokens = []
        for _ in range(20):
            batch = torch.cat([logits] * (1 + batch_extra))
            tokens.append(sampler(batch, [s, *others]).token_ids[0])
            s.append_token(tokens[-1], 0.0)  # the draw depends on the output position
        return tokens

    assert draw(0) == draw(0) == draw(3)
    assert len(set(draw(0))) > 1  # it does sample


def test_sampling_follows_the_distribution():
    sampler = Sampler(torch.device("cpu"), 0, eos_token_ids=[])
    probs = torch.tensor([0.1, 0.6, 0.3])
    seqs = [seq(SamplingParams(temperature=1.0)) for _ in range(3000)]
    tokens = sampler(probs.log().repeat(3000, 1), seqs).token_ids
    freq = [tokens.count(i) / 3000 for i in range(3)]
    assert freq == pytest.approx(probs.tolist(), abs=0.04)


def test_min_tokens_masks_eos_and_stop_token_ids():
    sampler = Sampler(torch.device("cpu"), 0, eos_token_ids=[0])
    logits = torch.tensor([[9.0, 8.0, 1.0]])
    early = seq(SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[1]), output=(2,))
    assert sampler(logits.clone(), [early]).token_ids == [2]
    done = seq(SamplingParams(temperature=0, min_tokens=1, stop_token_ids=[1]), output=(2,))
    assert sampler(logits.clone(), [done]).token_ids == [0]


def test_logits_processor_errors_are_reported_per_row():
    def boom(ids, row):
        raise RuntimeError("nope")

    def ban_first(ids, row):
        row[0] = -math.inf
        return row

    sampler = Sampler(torch.device("cpu"), 0, eos_token_ids=[])
    logits = torch.tensor([[5.0, 1.0], [5.0, 1.0]])
    result = sampler(
        logits, [seq(SamplingParams(temperature=0, logits_processors=[boom])), seq(SamplingParams(temperature=0, logits_processors=[ban_first]))]
    )
    assert "nope" in result.errors[0] and 1 not in result.errors
    assert result.token_ids[1] == 1


def test_seeded_noise_is_exponential_and_depends_on_seed_and_step():
    from baton.engine.sampler import seeded_exponential

    noise = seeded_exponential([1, 1, 2], [0, 1, 0], 20000, torch.device("cpu"))
    assert noise.min() > 0
    assert noise.mean().item() == pytest.approx(1.0, abs=0.03)  # Exp(1): mean 1, variance 1
    assert noise.var().item() == pytest.approx(1.0, abs=0.08)
    assert not torch.equal(noise[0], noise[1]) and not torch.equal(noise[0], noise[2])
    assert torch.equal(noise[0], seeded_exponential([1], [0], 20000, torch.device("cpu"))[0])


def test_noise_bits_never_map_to_zero_or_one():
    from baton.engine.sampler import bits_to_uniform

    u = bits_to_uniform(torch.tensor([0, (1 << 23) - 1]))
    assert 0.0 < u[0] and u[1] < 1.0 and -torch.log(u[1]) > 0


def test_a_masked_token_is_never_sampled_by_a_seeded_request():
    # Only two tokens allowed (as under a grammar): every seeded draw must pick one of them.
    sampler = Sampler(torch.device("cpu"), 0, eos_token_ids=[])
    logits = torch.full((64, 5000), float("-inf"))
    logits[:, 7] = 0.0
    logits[:, 4999] = 1.0
    seqs = [seq(SamplingParams(temperature=1.0, seed=i)) for i in range(64)]
    for step in range(20):
        tokens = sampler(logits.clone(), seqs).token_ids
        assert set(tokens) <= {7, 4999}
        for s, t in zip(seqs, tokens):
            s.append_token(t, 0.0)


def test_sample_ids_takes_the_argmax_of_the_model_dtype_only_where_nothing_edits_the_row():
    sampler = Sampler(torch.device("cpu"), 0, eos_token_ids=[0])
    logits = torch.randn(6, 300).to(torch.bfloat16)
    logits[2, 7] = logits[2, 250] = logits[2].max() + 1  # a tie: both take the first index
    plain = [seq(SamplingParams(temperature=0)) for _ in range(6)]
    assert sampler.sample_ids(logits, plain).tolist() == sampler(logits.clone(), plain).token_ids
    assert sampler.sample_ids(logits, plain)[2].item() == 7
    # A row still under min_tokens has its stop tokens masked: the plain argmax would be wrong.
    row = torch.tensor([[9.0, 8.0, 1.0]], dtype=torch.bfloat16)
    early = seq(SamplingParams(temperature=0, min_tokens=2), output=(2,))
    assert sampler.sample_ids(row.clone(), [early]).tolist() == [1]
    penalised = seq(SamplingParams(temperature=0, repetition_penalty=100.0), output=(0,))
    assert sampler.sample_ids(row.clone(), [penalised]).tolist() == [1]
