"""`baton up` itself: the curl it prints works, Ctrl-C stops every process it started."""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import subprocess
import sys

import httpx
from serving_harness import baton_up, free_port, wait_until


def test_printed_curl_works_and_ctrl_c_leaves_nothing_behind(_tiny_model_cache):
    dep = baton_up("--mode", "colocated", "--served-model-name", "tiny,alias")
    assert set(dep.processes) == {"colocated-0", "router"}
    assert any("its text is random" in line for line in dep.output)
    curl = next(line.strip() for line in dep.output if line.strip().startswith("curl "))
    result = subprocess.run(shlex.split(curl), capture_output=True, text=True, timeout=60)
    answer = json.loads(result.stdout)
    assert answer["object"] == "chat.completion" and answer["model"] == "tiny"
    assert answer["usage"]["completion_tokens"] >= 1
    assert dep.stop(signal.SIGINT) == 0
    for process in dep.processes.values():
        wait_until(lambda p=process: not p.alive(), timeout=10, what=f"{process.name} to exit")


def test_help_shows_every_flag_with_its_default():
    from baton.up import build_parser

    parser = build_parser()
    text = " ".join(parser.format_help().split())
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or not action.option_strings or action.dest == "help":
            continue
        assert action.option_strings[0] in text
        assert action.help, action.option_strings
        if action.default not in (None, []) and not isinstance(action.default, bool):
            assert f"(default: {action.default})" in text, action.option_strings
    assert "(default: None)" not in text and "(default: False)" not in text  # nothing to show
    assert "(default: [])" not in text


def test_the_api_key_is_in_no_command_line_and_never_printed(colocated):
    key = colocated.api_key.encode()
    pids = [colocated.proc.pid, *(p.pid for p in colocated.processes.values())]
    for pid in pids:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            assert key not in f.read(), pid
    assert not any(colocated.api_key in line for line in colocated.output)
    assert any("Bearer $BATON_API_KEY" in line for line in colocated.output)  # the curl names the variable
    refused = subprocess.run([sys.executable, "-m", "baton.cli", "up", "--api-key", "k"],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "BATON_API_KEY" in refused.stderr


def test_a_worker_that_cannot_start_fails_the_start_and_says_why(_tiny_model_cache):
    failed = subprocess.run([sys.executable, "-m", "baton.cli", "up", "--mode", "colocated", "--quiet",
                             "--port", str(free_port()), "--device", "cpu", "--max-num-seqs", "0"],
                            capture_output=True, text=True, timeout=180)
    assert failed.returncode == 1
    assert "failed to start: colocated-0 exited with status 2" in failed.stderr
    assert "max_num_seqs must be >= 1" in failed.stderr  # the worker's own words


def test_bad_arguments_fail_fast():
    bad = subprocess.run([sys.executable, "-m", "baton.cli", "up", "--model", "/nonexistent"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "not a model directory" in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "baton.cli", "up", "--prefill", "0"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2


def test_colocated_workers_are_planned_under_one_name(tiny_model_dir):
    """`--colocated N` (older spelling `--workers N`) starts N `serve-colocated` processes
    and hands them to the router with `--colocated`."""
    from baton.up import build_parser, plan, router_child

    for flag in ("--colocated", "--workers"):
        args = build_parser().parse_args(["--mode", "colocated", flag, "2"])
        workers = plan(args, tiny_model_dir)
        router = router_child(args, tiny_model_dir, workers)
        assert [c.name for c in workers] == ["colocated-0", "colocated-1"]
        assert all(c.argv[0] == "serve-colocated" and "--kv-transfer" not in c.argv for c in workers)
        assert router.argv[router.argv.index("--colocated") + 1].count(",") == 1


def test_killing_baton_up_outright_takes_its_children_along(_tiny_model_cache):
    dep = baton_up("--mode", "colocated")
    dep.proc.kill()  # SIGKILL: no chance to clean up; the children get the parent-death signal
    dep.proc.wait(timeout=10)
    for process in dep.processes.values():
        wait_until(lambda p=process: not p.alive(), timeout=20, what=f"{process.name} to exit")


def test_router_drains_and_exits_0_on_sigterm(tiny_model_dir):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "baton.cli", "serve-router", "--model", str(tiny_model_dir),
                             "--colocated", "127.0.0.1:1", "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def healthy() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(healthy, timeout=60, what="the router")
    # No healthy worker: requests get 503, the router itself is alive (not ready).
    assert httpx.get(f"http://127.0.0.1:{port}/ready").status_code == 503
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0


def test_auto_transport_hands_kv_over_shared_memory_between_workers_on_one_host(_tiny_model_cache):
    """`baton up --transport auto`: the prefill and decode workers share this host, so their
    handoffs take `ipc`, and both workers' metrics say so."""
    import openai

    dep = baton_up("--mode", "disaggregated", "--transport", "auto")
    try:
        client = openai.OpenAI(base_url=f"{dep.url}/v1", api_key="unused")
        out = client.completions.create(model="tiny-llama-v1", prompt="The cell", max_tokens=4,
                                        temperature=0)
        assert out.usage.completion_tokens == 4
        for name in ("prefill-0", "decode-0"):
            text = httpx.get(dep.processes[name].metrics_url, timeout=10).text
            handoffs = [line for line in text.splitlines()
                        if line.startswith("baton:kv_transfer_seconds_count{") and 'transport="ipc"' in line]
            assert handoffs and float(handoffs[0].rsplit(" ", 1)[1]) >= 1, (name, text[-2000:])
    finally:
        assert dep.stop(signal.SIGINT) == 0
