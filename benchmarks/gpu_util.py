"""Timing and error capture shared by the GPU check's sections."""

from __future__ import annotations

import time
import traceback

import torch


def timed(fn, dev: str, iters: int = 20, warmup: int = 3) -> float:
    """Seconds per call of `fn` on `dev` (CUDA events on GPUs, wall clock on the CPU)."""
    for _ in range(warmup):
        fn()
    if dev != "cuda":
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t) / iters
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters / 1e3


def guarded(fn, *args, **kw):
    """fn's result, or {"error": ...} when it raises: one failing check must not end the run."""
    try:
        return fn(*args, **kw)
    except Exception as e:  # recorded in the results, with where it happened
        tb = traceback.extract_tb(e.__traceback__)[-1]
        return {"error": f"{type(e).__name__}: {e} ({tb.filename.split('/')[-1]}:{tb.lineno})"}


def empty_cache(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.empty_cache()


def rate(nbytes: float, seconds: float) -> dict:
    """ms and GB/s of a timed call that moves `nbytes`."""
    return {"ms": seconds * 1e3, "gbps": nbytes / seconds / 1e9}
