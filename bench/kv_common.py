"""What the KV handoff benchmarks (`kv_transfer.py`, `kv_cell.py`) share: the machine they
record, the spread of a list of timings, and the torch peer copy they compare a handoff with.
"""

from __future__ import annotations

import os
import platform
import statistics
from pathlib import Path


def machine(device: str) -> str:
    """CPU model and count, Python, torch, grpcio (and ucxx where installed); on CUDA every
    visible GPU first."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    desc = f"{os.cpu_count()} x {cpu}, Python {platform.python_version()}"
    import grpc
    import torch

    desc += f", torch {torch.__version__}, grpcio {grpc.__version__}"
    try:
        import ucxx

        desc += f", ucxx {ucxx.__version__}"
    except ImportError:
        pass
    if device == "cuda":
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        desc = f"{len(names)} x {names[0]}; " + desc
    return desc


def spread(values: list[float]) -> dict:
    """Median, 10th and 90th percentile (linear between samples), min and max."""
    ordered = sorted(values)

    def pct(p: float) -> float:
        k = (len(ordered) - 1) * p
        lo = int(k)
        hi = min(lo + 1, len(ordered) - 1)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)

    return {"median": statistics.median(ordered), "p10": pct(0.1), "p90": pct(0.9),
            "min": ordered[0], "max": ordered[-1]}


def peer_copy(nbytes: int, reps: int, source: str = "cuda:0", target: str = "cuda:1") -> dict:
    """A plain torch copy `source` -> `target` of `nbytes` (the reference a handoff of the same
    bytes is compared with), timed by CUDA events on the source's stream after 3 untimed
    copies; the first 4 KiB are checked. Returns median/p10/p90 ms and the median's GB/s."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device=source).random_(0, 255)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=target)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize(source)
    torch.cuda.synchronize(target)
    times = []
    with torch.cuda.device(source):
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    if not torch.equal(src[:4096].cpu(), dst[:4096].cpu()):
        raise RuntimeError("peer copy check failed")
    ms = spread(times)
    return {"source": source, "target": target, "bytes": nbytes, "reps": reps, "median_ms": ms["median"],
            "p10_ms": ms["p10"], "p90_ms": ms["p90"], "gbps": nbytes / (ms["median"] / 1e3) / 1e9}
