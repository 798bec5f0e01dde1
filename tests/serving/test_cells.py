"""Cells (`baton serve-cell`): prefill and decode engines of one pod, KV between them by `ipc`,
and a router that pairs a prefill engine with a decode engine of the same cell. Two cells
of one prefill and one decode engine each on loopback, as real processes.

The tests run in file order; the last one kills an engine (its cell exits).
"""

from __future__ import annotations

import json
import os
import signal
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serving_harness import serve_cell, serve_router, wait_until

M = "tiny-llama-v1"
PAIRINGS = "baton:router_kv_handoffs_total"
PROMPT = "A prompt long enough to be prefilled by a prefill engine"


@pytest.fixture(scope="module")
def cells(_tiny_model_cache):
    started = []
    try:
        for name in ("cell-a", "cell-b"):
            started.append(serve_cell(name))
        yield {c.name: c for c in started}
    finally:
        for cell in started:
            cell.stop()


@pytest.fixture(scope="module")
def router(cells, tiny_model_dir):
    a, b = cells["cell-a"], cells["cell-b"]
    r = serve_router(tiny_model_dir, "--prefill", ",".join(a.addresses("prefill") + b.addresses("prefill")),
                     "--decode", ",".join(a.addresses("decode") + b.addresses("decode")))
    yield r
    r.stop()


def ipc_handoffs(cell, engine: str) -> float:
    """Completed handoffs this engine took part in that moved their bytes by `ipc`."""
    return cell.metric(engine, "baton:kv_transfer_seconds_count", 'transport="ipc"')


def health(cell) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{cell.health_port}") as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def test_a_cell_serves_health_for_the_pod_and_its_engines_report_the_cell(cells):
    from baton.protos import worker_pb2, worker_pb2_grpc

    for cell in cells.values():
        assert health(cell) == health_pb2.HealthCheckResponse.SERVING
        assert sorted(cell.engines) == ["decode-0", "prefill-0"]
        for engine in cell.engines.values():
            with grpc.insecure_channel(engine.grpc) as channel:
                info = worker_pb2_grpc.WorkerStub(channel).Info(worker_pb2.InfoRequest(), timeout=10)
            assert info.cell == cell.name and info.kv_transfer == "auto"


def test_handoffs_stay_inside_the_cell_and_move_by_ipc(cells, router):
    """Every request's prefill engine is the one in its decode engine's cell: the router's
    pairing counter says so, and so do the engines' own transport metrics (each cell's
    prefill engine sent as many ipc handoffs as its decode engine received)."""
    client = router.client()
    same, cross = router.counter(PAIRINGS, 'pairing="same_cell"'), router.counter(PAIRINGS, 'pairing="cross_cell"')
    before = {(c.name, e): ipc_handoffs(c, e) for c in cells.values() for e in c.engines}
    n = 6
    for i in range(n):
        out = client.completions.create(model=M, prompt=f"{PROMPT} {i}", max_tokens=4, temperature=0,
                                        extra_body={"ignore_eos": True})
        assert out.usage.completion_tokens == 4
    assert router.counter(PAIRINGS, 'pairing="same_cell"') == same + n, "".join(router.output[-40:])
    assert router.counter(PAIRINGS, 'pairing="cross_cell"') == cross
    gained = {key: ipc_handoffs(cells[key[0]], key[1]) - value for key, value in before.items()}
    for cell in cells.values():
        assert gained[(cell.name, "prefill-0")] == gained[(cell.name, "decode-0")]
    assert sum(gained[(c, "decode-0")] for c in cells) == n


def test_a_pair_across_cells_is_counted_as_such(cells, tiny_model_dir):
    """A router given only cell-a's prefill engine and cell-b's decode engine pairs across
    cells (on one host `auto` still finds shared memory; between pods it takes the network)."""
    a, b = cells["cell-a"], cells["cell-b"]
    r = serve_router(tiny_model_dir, "--prefill", a.addresses("prefill")[0], "--decode", b.addresses("decode")[0])
    try:
        out = r.client().completions.create(model=M, prompt=PROMPT, max_tokens=3, temperature=0,
                                            extra_body={"ignore_eos": True})
        assert out.usage.completion_tokens == 3
        assert r.counter(PAIRINGS, 'pairing="cross_cell"') == 1
        assert r.counter(PAIRINGS, 'pairing="same_cell"') == 0
    finally:
        r.stop()


def test_a_decode_engine_killed_mid_stream_takes_its_cell_down_and_the_stream_resumes_in_the_other(cells, router):
    """kill -9 the decode engine serving a stream: its cell stops its other engine and exits
    1 (the kubelet would restart the pod), and the router resumes the stream on the other
    cell's pair (the prompt and the streamed tokens prefilled there, handed over by ipc):
    the client gets the text of an undisturbed run."""
    client = router.client(timeout=120)
    request = {"model": M, "prompt": PROMPT, "max_tokens": 1500, "temperature": 0, "extra_body": {"ignore_eos": True}}
    expected = client.completions.create(**request).choices[0].text
    same = router.counter(PAIRINGS, 'pairing="same_cell"')
    failovers = router.counter("baton:router_failovers_total", "")
    victim: list = []
    text = ""
    for n, chunk in enumerate(client.completions.create(**request, stream=True), 1):
        text += chunk.choices[0].text
        if n == 6:
            # The decode engine running a request serves this stream (the other is idle).
            victim.append(max(cells.values(), key=lambda c: c.metric("decode-0", "baton:num_requests_running")))
            engines = [int(p) for p in open(f"/proc/{victim[0].proc.pid}/task/{victim[0].proc.pid}/children")
                       .read().split()]
            decode_pid = next(pid for pid in engines if "serve-decode" in open(f"/proc/{pid}/cmdline").read())
            os.kill(decode_pid, signal.SIGKILL)
    assert text == expected
    assert router.counter("baton:router_failovers_total", "") == failovers + 1
    assert router.counter(PAIRINGS, 'pairing="same_cell"') == same + 2  # the first run and the resumed one
    dead = victim[0]
    assert dead.proc.wait(timeout=60) == 1
    assert any("stopping the cell" in line for line in dead.output)
    for pid in engines:
        wait_until(lambda p=pid: not os.path.exists(f"/proc/{p}") or open(f"/proc/{p}/stat").read().split()[2] == "Z",
                   timeout=30, what=f"engine {pid} to exit")
    wait_until(lambda: router_sees_one_pair(router), timeout=30, what=f"the router to drop {dead.name}")
    survivor = next(c for c in cells.values() if c is not dead)
    wait_until(lambda: all(survivor.metric(e, "baton:kv_cache_usage_perc") == 0.0 for e in survivor.engines),
               what="no KV held in the surviving cell")


def router_sees_one_pair(router) -> bool:
    with urllib.request.urlopen(f"{router.url}/ready", timeout=5) as response:
        workers = json.load(response)["workers"]
    return workers["prefill"]["healthy"] == 1 and workers["decode"]["healthy"] == 1


@pytest.mark.parametrize("argv, message", [
    (["--prefill", "0"], "needs --prefill >= 1 and --decode >= 1"),
    (["--metrics-port", "9000"], "--metrics-port is set per engine by the cell"),
    (["--kv-transfer=tcp"], "--kv-transfer is set per engine by the cell"),
    (["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 2}'],
     "--speculative-config would reach the prefill engines"),
    (["--prefill-args=--num-speculative-tokens 2 --speculative-model [ngram]"],
     "--num-speculative-tokens would reach the prefill engines"),
])
def test_serve_cell_refuses_what_it_sets_itself_or_cannot_run(argv, message, capsys):
    from baton.cell import main

    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_speculative_decoding_reaches_only_the_decode_engines_through_decode_args():
    from baton.cell import build_parser, plan

    spec = '{"method": "ngram", "num_speculative_tokens": 2}'
    args = build_parser().parse_args(["--prefill", "2", "--decode", "1", "--cell", "c",
                                      f"--decode-args=--speculative-config '{spec}'"])
    engines = {engine.name: engine.argv for engine in plan(args, ["--model", "/m"], 0)}
    assert [name for name, argv in engines.items() if "--speculative-config" in argv] == ["decode-0"]
    assert engines["decode-0"][engines["decode-0"].index("--speculative-config") + 1] == spec
