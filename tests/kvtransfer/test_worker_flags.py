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
