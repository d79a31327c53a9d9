"""A kernel's first use on a device is checked once against its torch reference, on small shapes.

`checked(name, run_kernel, run_reference, make_inputs, tol, device, dtype)` answers whether kernel
`name` may run for (device, dtype): the first time, it builds the inputs twice (same seed), runs the
kernel on one copy and the reference on the other, and compares every returned tensor (outputs
and the states updated in place). A compile error, an exception or a difference beyond `tol`
disables that kernel for the process: the caller takes the reference path, a warning is logged
and raised (`KernelFallback`), and `kernel_fallbacks[name]` counts it (stage stats -> metrics).
`guarded` does the same for a real call that raises (a shape the check did not compile).

The verdicts are per process: a stage actor is one process, so they are that stage's.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

# Default tolerance by dtype: the kernels and references differ in summation order and in where
# low-precision operands are rounded (a few bf16 ulps at values of order 1).
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


class KernelFallback(RuntimeWarning):
    """A kernel failed its self-check (or a call): the reference path runs instead."""


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    detail: str  # "max err 3e-07 (tol 1e-04)", or why it failed


_verdicts: dict[tuple[str, str, str], Verdict] = {}
_fallbacks: Counter[str] = Counter()
_generation = 0  # bumped whenever a kernel is disabled (or all are forgotten): choices change


def generation() -> int:
    """Callers may cache their choice of kernel as long as this stays the same."""
    return _generation


def capturing() -> bool:
    return _capturing()


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _tensors(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, tuple | list) else [out]


def compare(got, want, tol: float) -> str | None:
    """None when every tensor of `got` is within tol (absolute and relative) of `want`'s, else
    what differs. NaN/inf where the reference is finite is a mismatch."""
    got, want = _tensors(got), _tensors(want)
    if len(got) != len(want):
        return f"{len(got)} outputs, reference gives {len(want)}"
    worst = 0.0
    for i, (g, w) in enumerate(zip(got, want)):
        if g.shape != w.shape:
            return f"output {i}: shape {tuple(g.shape)}, reference {tuple(w.shape)}"
        g, w = g.detach().float().cpu(), w.detach().float().cpu()
        if not bool(torch.isfinite(g[torch.isfinite(w)]).all()):
            return f"output {i}: non-finite values where the reference is finite"
        finite = torch.isfinite(w)  # (NaN in err would hide every other difference from max)
        err = ((g - w).abs() - tol * w.abs())[finite]
        worst = max(worst, float(err.max()) if err.numel() else 0.0)
    return None if worst <= tol else f"max err {worst:.3g} beyond tol {tol:.1g}"


def checked(
    name: str,
    run_kernel: Callable,
    run_reference: Callable,
    make_inputs: Callable,
    tol: float | None = None,
    *,
    device: torch.device | str,
    dtype: torch.dtype,
) -> bool:
    """Whether kernel `name` may run for (device, dtype). make_inputs(device, dtype) -> inputs
    (deterministic: called twice); run_*(inputs) -> a tensor or a tuple of tensors."""
    key = (name, str(torch.device(device)), str(dtype))
    verdict = _verdicts.get(key)
    if verdict is not None:
        return verdict.ok
    if _capturing():  # no host sync inside a CUDA graph capture (warm-up runs come first)
        return False
    tol = TOL.get(dtype, 5e-2) if tol is None else tol
    try:
        got = run_kernel(make_inputs(device, dtype))
        want = run_reference(make_inputs(device, dtype))
        why = compare(got, want, tol)
    except Exception as e:  # a compile error or a launch failure: the reference runs instead
        why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    _verdicts[key] = Verdict(why is None, why or "ok")
    if why is not None:
        disable(name, key, why)
    return why is None


def disable(name: str, key: tuple[str, str, str], why: str) -> None:
    """Turn `name` off for key's (device, dtype), warn and count it."""
    global _generation
    _generation += 1
    _verdicts[key] = Verdict(False, why)
    _fallbacks[name] += 1
    msg = f"kernel {name} on {key[1]} ({key[2]}) disabled, using the torch reference: {why}"
    log.warning(msg)
    warnings.warn(msg, KernelFallback, stacklevel=3)


def guarded(name: str, kernel: Callable, reference: Callable, device, dtype) -> Callable:
    """`kernel` that, when a real call raises (outside a CUDA graph capture), disables itself and
    answers with `reference` (same signature). That is exact when the launch failed before
    writing (compile and launch errors); an in-place kernel that failed part-way, or an
    asynchronous device error, may leave states the reference then updates again."""

    def call(*args, **kw):
        try:
            return kernel(*args, **kw)
        except Exception as e:
            if _capturing():  # the decode-graph capture handles its own failures
                raise
            key = (name, str(torch.device(device)), str(dtype))
            disable(name, key, f"{type(e).__name__} on a call: {e}")
            return reference(*args, **kw)

    return call


def stats() -> dict:
    """Stage stats: fallbacks per kernel name (0 for kernels that passed) and each verdict."""
    names = {k[0] for k in _verdicts}
    return {
        "kernel_fallbacks": {n: _fallbacks[n] for n in sorted(names | set(_fallbacks))},
        "kernel_checks": {f"{n}@{d}/{t}": v.detail for (n, d, t), v in sorted(_verdicts.items())},
    }


def reset() -> None:
    """Forget every verdict and count (tests; a stage never re-enables a kernel)."""
    global _generation
    _generation += 1
    _verdicts.clear()
    _fallbacks.clear()
