"""Timing a launch sequence on the GPU from CUDA-graph replays (launch overhead excluded)."""

from __future__ import annotations

import torch


def graph_time(fn, repeats: int = 5) -> float:
    """Seconds per call of `fn` (which launches work on the current stream), from graph replays."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats
