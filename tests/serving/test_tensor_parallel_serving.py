"""Tensor-parallel workers behind the router (`baton up --tensor-parallel-size 2` on the CPU:
two processes over gloo per worker) answer as a TP 1 engine does, colocated and with the KV
handed from a TP 2 prefill worker to a TP 2 decode worker."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import httpx
from serving_harness import baton_up, wait_until

from baton.worker.flags import parse


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def test_tp2_colocated_worker_serves_what_tp1_computes_and_restarts_when_a_rank_dies(tiny_model_dir):
    from baton.engine import LLM, SamplingParams

    prompt = "The quick brown fox"
    want = LLM(model=str(tiny_model_dir), device="cpu", num_gpu_blocks_override=64).generate(
        prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0].outputs[0].text
    dep = baton_up("--mode", "colocated", "--tensor-parallel-size", "2")

    def complete() -> httpx.Response:
        return httpx.post(f"{dep.url}/v1/completions", timeout=120, json={
            "model": tiny_model_dir.name, "prompt": prompt, "max_tokens": 12, "temperature": 0,
            "ignore_eos": True})

    try:
        reply = complete()
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["text"] == want

        worker = dep.processes["colocated-0"]
        [rank1] = _children(worker.pid)  # the worker's one child: tensor-parallel rank 1
        os.kill(rank1, signal.SIGKILL)
        failed = complete()  # the engine fails the request at once, then the worker exits 1
        assert failed.status_code >= 500
        wait_until(lambda: not worker.alive(), timeout=60, what="the worker with a dead rank to exit")
        wait_until(lambda: any(re.search(r"colocated-0 exited with status 1", line) for line in dep.output),
                   timeout=30, what="baton up to report the worker's exit status")
        # `baton up` starts it again (after its back-off); the service answers as before.
        wait_until(lambda: complete().status_code == 200, timeout=180, what="the restarted worker")
        assert complete().json()["choices"][0]["text"] == want
    finally:
        assert dep.stop() == 0


def test_disaggregated_tp2_workers_hand_off_the_kv_and_answer_as_tp1(tiny_model_dir):
    from baton.engine import LLM, SamplingParams

    prompt = "The quick brown fox"
    want = LLM(model=str(tiny_model_dir), device="cpu", num_gpu_blocks_override=64).generate(
        prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0].outputs[0].text
    engine_args, _ = parse(["--tensor-parallel-size", "2"], "baton serve-prefill", "prefill")
    assert engine_args.tensor_parallel_size == 2
    dep = baton_up("--mode", "disaggregated", "--tensor-parallel-size", "2", timeout=240)
    try:
        reply = httpx.post(f"{dep.url}/v1/completions", timeout=120, json={
            "model": tiny_model_dir.name, "prompt": prompt, "max_tokens": 12, "temperature": 0,
            "ignore_eos": True})
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["text"] == want
    finally:
        assert dep.stop() == 0
