"""Timing inside a CUDA graph: the one measurement both kernel tuning and the benchmark use."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence

import torch


def time_in_graph(
    fns: Sequence[Callable[[], object]], calls: int, repeats: int, warmup_replays: int = 1
) -> float:
    """Median µs per call: ``calls`` calls (cycling through ``fns``) captured in one CUDA graph.

    Each function runs once eagerly on a side stream (so lazy initialisation happens outside the
    capture), the graph is replayed ``warmup_replays`` times untimed, then ``repeats`` timed
    replays are measured with CUDA events; Python dispatch is not counted.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fns[i % len(fns)]()
    for _ in range(warmup_replays):
        graph.replay()
    torch.cuda.synchronize()
    per_call = median_event_us(graph.replay, repeats) / calls
    del graph
    return per_call


def median_event_us(run: Callable[[], object], repeats: int) -> float:
    """Median µs of ``run()`` over ``repeats`` runs, each timed on the GPU between two CUDA events."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0)
    return statistics.median(times)
