"""The workers' KV-transfer flags reach the options the transfer layer is built from."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from baton.kvtransfer import TransferConfig
from baton.worker.flags import UCX_PROGRESS_MODES, parse


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_ucx_progress_mode_flag(role):
    _, opts = parse(["--kv-transfer", "ucx", "--ucx-progress-mode", "thread-polling"], f"baton serve-{role}", role)
    assert opts.ucx_progress_mode == "thread-polling"
    assert TransferConfig(ucx_progress_mode=opts.ucx_progress_mode).ucx_progress_mode == "thread-polling"
    _, opts = parse([], f"baton serve-{role}", role)
    assert opts.ucx_progress_mode is None  # UCXX's own default


def test_ucx_progress_mode_flag_rejects_unknown_modes(capsys):
    with pytest.raises(SystemExit) as exc:
        parse(["--ucx-progress-mode", "busy"], "baton serve-decode", "decode")
    assert exc.value.code == 2 and "--ucx-progress-mode" in capsys.readouterr().err
    for mode in UCX_PROGRESS_MODES:  # every mode the flag takes, the transfer layer takes
        TransferConfig(ucx_progress_mode=mode)


@pytest.mark.parametrize("flag, allowed", [
    ("grpc", ("grpc",)),
    ("ucx", ("grpc", "ucx")),
    ("tcp", ("grpc", "tcp")),
    ("auto", ("grpc", "tcp", "ipc", "ucx")),
])
def test_kv_transfer_flag_sets_the_data_planes_a_prefill_worker_may_use(flag, allowed):
    from baton.kvtransfer.transport import sender_transports

    _, opts = parse(["--kv-transfer", flag], "baton serve-prefill", "prefill")
    assert opts.kv_transfer == flag
    assert sender_transports(opts.kv_transfer) == allowed


def test_kv_tcp_port_flag(capsys):
    _, opts = parse(["--kv-transfer", "tcp", "--kv-tcp-port", "6001"], "baton serve-decode", "decode")
    assert opts.kv_tcp_port == 6001
    assert parse([], "baton serve-decode", "decode")[1].kv_tcp_port == 50053
    with pytest.raises(SystemExit):
        parse(["--kv-tcp-port", "70000"], "baton serve-decode", "decode")
    assert "--kv-tcp-port must be a TCP port" in capsys.readouterr().err


NGRAM = json.dumps({"method": "ngram", "num_speculative_tokens": 2})


@pytest.mark.parametrize("argv, flag", [
    (["--speculative-config", NGRAM], "--speculative-config"),
    (["--speculative-model", "[ngram]", "--num-speculative-tokens", "2"], "--speculative-model"),
    (["--num-speculative-tokens=2"], "--num-speculative-tokens"),
])
def test_a_prefill_worker_refuses_speculative_decoding_by_name(argv, flag):
    """Its requests end at their first token: a draft would only take memory, so the
    setting is refused at start, before any model loads, saying where it belongs."""
    result = subprocess.run([sys.executable, "-m", "baton.cli", "serve-prefill", *argv, "--port", "0",
                             "--metrics-port", "0"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result
    assert f"baton serve-prefill: error: {flag} does not apply to a prefill worker" in result.stderr
    assert "set it on the decode workers (baton serve-decode) or colocated workers" in result.stderr


@pytest.mark.parametrize("role", ["decode", "colocated"])
def test_decode_and_colocated_workers_take_speculative_decoding(role):
    engine_args, _ = parse(["--speculative-config", NGRAM], f"baton serve-{role}", role)
    assert json.loads(engine_args.speculative_config) == {"method": "ngram", "num_speculative_tokens": 2}
