"""A real third-party client: lm-evaluation-harness's `local-completions` model against the
disaggregated router (its loglikelihoods come from `echo` with `logprobs`, its tokenizer
from /tokenizer_info, /tokenize and /detokenize), on a small multiple-choice task and a small
generation task; every per-sample number equals the offline engine's on the same weights."""

from __future__ import annotations

import json

import pytest

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.model import TemplateLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from baton.engine import LLM, SamplingParams  # noqa: E402

QUESTIONS = [
    ("The capital of France is", [" Paris", " Rome", " a small town by the sea"], 0),
    ("Two plus two equals", [" four", " five"], 0),
    ("The quick brown fox jumps over the", [" lazy dog", " moon", " fence"], 0),
    ("Water freezes at zero degrees", [" Celsius", " Fahrenheit"], 0),
    ("Once upon a", [" time", " table"], 0),
]
TASKS = {
    "baton_tiny_choice": {"output_type": "multiple_choice", "doc_to_choice": "{{choices}}",
                          "doc_to_target": "{{answer}}", "metric_list": [{"metric": "acc"}]},
    "baton_tiny_generate": {"output_type": "generate_until", "doc_to_target": "{{choices[0]}}",
                            "generation_kwargs": {"until": ["\n"], "max_gen_toks": 8, "do_sample": False,
                                                  "temperature": 0},
                            "metric_list": [{"metric": "exact_match"}]},
}


class OfflineBaton(TemplateLM):
    """The same requests answered by Baton's offline engine, tokenised as lm-eval's API
    models tokenise (no special tokens added)."""

    def __init__(self, model_dir):
        super().__init__()
        self.llm = LLM(model=str(model_dir), device="cpu", num_gpu_blocks_override=64)
        self.tok = self.llm.get_tokenizer()

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_token_ids[0]

    def tok_encode(self, string, add_special_tokens=None, **kwargs):
        return self.tok.encode(string, add_special_tokens=bool(add_special_tokens))

    def _loglikelihood_tokens(self, requests, **kwargs):
        results = []
        for _, context, continuation in requests:
            out = self.llm.generate([{"prompt_token_ids": context + continuation}],
                                    SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1))[0]
            entries = out.prompt_logprobs[len(context):]
            results.append((sum(e[t] for e, t in zip(entries, continuation)),
                            all(e[t] >= max(e.values()) for e, t in zip(entries, continuation))))
        return results

    def generate_until(self, requests, **kwargs):
        texts = []
        for request in requests:
            context, gen = request.args
            params = SamplingParams(temperature=0, max_tokens=gen["max_gen_toks"], stop=gen["until"])
            texts.append(self.llm.generate([{"prompt_token_ids": self.tok_encode(context)}], params)[0].outputs[0].text)
        return texts

    def loglikelihood_rolling(self, requests, **kwargs):
        raise NotImplementedError


@pytest.fixture(scope="module")
def task_manager(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lm-eval-tasks")
    data = folder / "questions.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    for name, spec in TASKS.items():
        config = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
                  "test_split": "test", "doc_to_text": "{{question}}", **spec}
        (folder / f"{name}.yaml").write_text(json.dumps(config))  # YAML is a superset of JSON
    return TaskManager(include_path=str(folder))


def evaluate(model, task_manager, **kwargs) -> dict:
    return lm_eval.simple_evaluate(model=model, tasks=list(TASKS), task_manager=task_manager, log_samples=True,
                                   **kwargs)


def per_sample(result: dict, task: str) -> list:
    return [s["resps"] for s in sorted(result["samples"][task], key=lambda s: s["doc_id"])]


def test_lm_eval_through_the_router_matches_the_offline_engine(disaggregated, task_manager, tiny_model_dir,
                                                               monkeypatch, caplog):
    caplog.set_level("INFO", logger="lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    served = evaluate("local-completions", task_manager, batch_size=4, model_args={
        "model": "tiny-llama-v1", "base_url": f"{disaggregated.url}/v1/completions", "tokenizer_backend": "auto",
        "max_retries": 1})
    assert "Auto-detected remote tokenizer support" in caplog.text  # /tokenizer_info and /tokenize answered
    offline = evaluate(OfflineBaton(tiny_model_dir), task_manager)
    choice = per_sample(served, "baton_tiny_choice")
    want = per_sample(offline, "baton_tiny_choice")
    assert len(choice) == len(QUESTIONS)
    for got_doc, want_doc in zip(choice, want):
        for (got_ll, got_greedy), (want_ll, want_greedy) in zip(
                [r[0] for r in got_doc], [r[0] for r in want_doc]):
            assert float(got_ll) < 0 and float(got_ll) == pytest.approx(float(want_ll), abs=1e-3)
            assert got_greedy == want_greedy
    assert per_sample(served, "baton_tiny_generate") == per_sample(offline, "baton_tiny_generate")
    for task, metric in (("baton_tiny_choice", "acc,none"), ("baton_tiny_generate", "exact_match,none")):
        assert served["results"][task][metric] == offline["results"][task][metric]
