"""The workers' KV-transfer flags reach the options the transfer layer is built from."""

from __future__ import annotations

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
