"""Kernel self-checks: each kernel's first use on a device is compared once with its torch
reference; a wrong result, a compile error or a failing call disables it for the process, with a
warning, a `kernel_fallbacks` count in stage stats and a Prometheus line, and the reference runs.

Our Triton kernels run on CPU tensors under TRITON_INTERPRET=1, so the same machinery as on a GPU
runs here. The planted bug adds 1e-2 to a kernel's output: 100x the fp32 check tolerance (1e-4),
far above the ~1e-6 the real kernels differ by.
"""

import pytest
import torch

from tests.conftest import need_triton  # noqa: E402

need_triton()  # skips, or fails in CI, before the kernels are imported

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from jamba_ray.engine.messages import StepMessage  # noqa: E402
from jamba_ray.engine.metrics import EngineMetrics  # noqa: E402
from jamba_ray.model import kernels  # noqa: E402
from jamba_ray.model.kernels import decode, paged_attention, probes, reference  # noqa: E402
from jamba_ray.model.kernels.selfcheck import KernelFallback  # noqa: E402
from jamba_ray.model.kernels.selfcheck import reset as reset_checks  # noqa: E402
from jamba_ray.model.kernels.selfcheck import stats as check_stats  # noqa: E402
from jamba_ray.runtime.stage import Stage  # noqa: E402
from tests.conftest import seg, stage_logits, stage_spec  # noqa: E402

F32 = torch.zeros(1)


@pytest.fixture(autouse=True)
def fresh_verdicts():
    """Verdicts are per process: start and leave every test with none."""
    reset_checks()
    yield
    reset_checks()


def test_our_kernels_pass_their_checks_and_are_chosen():
    chosen = {op: kernels.choose(op, F32, block_size=16) for op in kernels.CANDIDATES}
    assert {op: c and c[0] for op, c in chosen.items()} == {
        "conv_update": "triton_conv_update",
        "ssm_update": "triton_ssm_update",
        "varlen_scan": "triton_varlen_scan",
        "paged_decode": "triton_paged_decode",
        "prefill": None,  # flash-attn only (CUDA): the model's torch path
    }
    st = check_stats()
    assert set(st["kernel_fallbacks"].values()) == {0}
    assert all(v.startswith("ok") for v in st["kernel_checks"].values()), st


def test_a_non_finite_reference_value_hides_no_mismatch_elsewhere():
    from jamba_ray.model.kernels.selfcheck import compare

    want = torch.tensor([float("inf"), 1.0, 2.0])
    assert compare(torch.tensor([float("inf"), 1.0, 2.0]), want, 1e-3) is None
    assert "max err" in compare(torch.tensor([float("inf"), 1.0, 9.0]), want, 1e-3)


def test_a_wrong_kernel_is_disabled_once_and_the_reference_answers(monkeypatch):
    real = decode.conv_update
    calls = []

    def planted(*a, **kw):
        calls.append(1)
        return real(*a, **kw) + 1e-2

    monkeypatch.setattr(decode, "conv_update", planted)
    x, state, w, b, slots = probes.conv_inputs("cpu", torch.float32)
    want_state = state.clone()
    want = reference.conv_update_ref(x, want_state, w, b, slots)
    with pytest.warns(KernelFallback, match="triton_conv_update .* disabled"):
        got = kernels.conv_update(x, state, w, b, slots)
    # the reference answered: the same fp32 arithmetic as calling it here, so 1e-6 is ample
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(state, want_state, atol=1e-6, rtol=0)
    kernels.conv_update(x, state, w, b, slots)  # decided once: no second check, no second count
    assert len(calls) == 1
    st = check_stats()
    assert st["kernel_fallbacks"]["triton_conv_update"] == 1
    assert "beyond tol" in st["kernel_checks"]["triton_conv_update@cpu/torch.float32"]
    # another kernel is unaffected
    assert kernels.choose("ssm_update", F32)[0] == "triton_ssm_update"


@triton.jit
def _bad_kernel(x_ptr, N: tl.constexpr):
    i = tl.arange(0, N)  # N = 3: not a power of two, refused when the kernel is compiled
    tl.store(x_ptr + i, tl.load(x_ptr + i) + 1)


def test_a_kernel_that_fails_to_compile_falls_back(monkeypatch):
    def broken(u, dt, A, B, C, ssm, slots, D=None, z=None):
        _bad_kernel[(1,)](u, N=3)
        return u

    monkeypatch.setattr(decode, "ssm_update", broken)
    with pytest.warns(KernelFallback, match="triton_ssm_update"):
        assert kernels.choose("ssm_update", F32) is None
    assert check_stats()["kernel_fallbacks"] == {"triton_ssm_update": 1}
    u, dt, A, B, C, ssm, slots = probes.ssm_inputs("cpu", torch.float32)
    y = kernels.ssm_update(u, dt, A, B, C, ssm.clone(), slots)
    want = reference.ssm_update_ref(u, dt, A, B, C, ssm.clone(), slots)
    torch.testing.assert_close(y, want, atol=1e-6, rtol=0)


def test_a_call_that_raises_after_the_check_disables_the_kernel(monkeypatch):
    """A shape the check did not compile fails on a real call: the reference answers that call,
    with the state untouched by the failed launch, and every later one."""
    real = paged_attention.paged_decode

    def fails_past_three_rows(q, *a, **kw):
        if q.shape[0] > 3:
            raise RuntimeError("no kernel for this shape")
        return real(q, *a, **kw)

    monkeypatch.setattr(paged_attention, "paged_decode", fails_past_three_rows)
    q, k, v, table, lens = probes.paged_inputs("cpu", torch.float32, bs=4)
    q, table, lens = torch.cat([q, q]), torch.cat([table, table]), torch.cat([lens, lens])
    with pytest.warns(KernelFallback, match="RuntimeError on a call"):
        got = kernels.paged_decode(q, k, v, table, lens, 0.25)
    torch.testing.assert_close(
        got, reference.paged_decode_ref(q, k, v, table, lens, 0.25), atol=1e-6, rtol=0
    )
    assert check_stats()["kernel_fallbacks"]["triton_paged_decode"] == 1
    assert kernels.choose("paged_decode", F32, block_size=4) is None


BOUNDS, MAX_LEN = [(0, 3)], 64  # one stage: an attention layer and Mamba layers


def test_a_stage_with_a_wrong_kernel_decodes_like_the_torch_path_and_reports_it(
    tiny_ckpt, monkeypatch
):
    """End to end: the planted paged kernel is caught on the stage's first decode step, the
    step's logits are the torch path's, and the stage's stats and the engine's metrics say so."""
    real = paged_attention.paged_decode
    monkeypatch.setattr(paged_attention, "paged_decode", lambda *a: real(*a) + 1e-2)
    torch_path, kernel_path = ([Stage(stage_spec(tiny_ckpt, 0, 0, 3, 1, 4, MAX_LEN))] for _ in "ab")
    prompts = {2: [1, 5, 9, 200, 3], 0: [1, 44]}
    msg = StepMessage(0, tuple(seg(s, s, 0, len(p), max_len=MAX_LEN) for s, p in prompts.items()))
    flat = [t for p in prompts.values() for t in p]
    want = stage_logits(torch_path, msg, flat)
    stage_logits(kernel_path, msg, flat)
    tokens = [int(r.argmax()) for r in want]
    msg = StepMessage(1, tuple(seg(s, s, len(p), 1, max_len=MAX_LEN) for s, p in prompts.items()))
    want = stage_logits(torch_path, msg, tokens)
    with monkeypatch.context() as m, pytest.warns(KernelFallback, match="triton_paged_decode"):
        m.setattr(kernels, "enabled_for", lambda t: True)
        got = stage_logits(kernel_path, msg, tokens)
    # fp32: the reference paged attention and the Triton Mamba kernels vs the torch path differ
    # in summation order only (~1e-6 on logits of order 1-10); the planted 1e-2 would show
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    st = kernel_path[0].stats()
    assert st["kernel_fallbacks"] == {
        "triton_conv_update": 0,
        "triton_paged_decode": 1,
        "triton_ssm_update": 0,
    }
    text = EngineMetrics().render({"stages": [st]})
    assert 'jamba_ray_stage_kernel_fallbacks_total{stage="0",kernel="triton_paged_decode"} 1' in (
        text
    )


def test_prefill_chunks_in_one_varlen_call_match_the_chunk_by_chunk_path(tiny_ckpt, monkeypatch):
    """The flash-attn varlen plumbing (cu_seqlens, gathered keys, a chunk continuing its
    sequence) with the reference standing in for flash-attn, which needs CUDA."""
    torch_path, varlen_path = ([Stage(stage_spec(tiny_ckpt, 0, 0, 3, 1, 4, MAX_LEN))] for _ in "ab")
    first = StepMessage(0, (seg(0, 0, 0, 2, max_len=MAX_LEN),))
    for path in (torch_path, varlen_path):  # slot 0 holds a first chunk
        stage_logits(path, first, [1, 44])
    segs = (seg(3, 3, 0, 6, max_len=MAX_LEN), seg(0, 0, 2, 3, max_len=MAX_LEN))
    msg, flat = StepMessage(1, segs), [1, 5, 9, 200, 3, 77, 3, 8, 13]
    want = stage_logits(torch_path, msg, flat)
    used = []

    def pick(op, t, **ctx):
        used.append(op)
        return reference.prefill_ref if op == "prefill" else None

    monkeypatch.setattr(kernels, "pick", pick)
    got = stage_logits(varlen_path, msg, flat)
    assert "prefill" in used
    # fp32 SDPA over the same keys, one mask per chunk either way: summation order only
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
