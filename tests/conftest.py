"""Session-wide fixtures: one local Ray instance, tiny checkpoints built once, HF references."""

from __future__ import annotations

import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Serve's replicas and handles push autoscaling metrics every 10 s by default; the autoscaling
# tests would wait that long per decision. Ray's workers inherit this (set before ray.init).
os.environ.setdefault("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "1")
os.environ.setdefault("RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "1")
# Triton kernels run on CPU tensors under its interpreter where CUDA cannot run them (no GPU, or a
# CPU build of torch on a GPU machine); triton reads this once, when it is first imported
# (transformers may import it; `import torch` does not), so it is set first.
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The tiny default model goes to $JAMBA_RAY_CACHE (else ~/.cache/jamba-ray): a private one per run,
# set before anything (Ray workers included) starts, so the suite writes nothing under ~/.cache.
os.environ["JAMBA_RAY_CACHE"] = tempfile.mkdtemp(prefix="jamba-ray-test-cache-")

import pytest

from jamba_ray.tiny import TinySpec, init_tiny

# A second layout: attention on even layers, MoE every third layer, odd layer count.
LAYOUT_B = (
    ("num_hidden_layers", 5),
    ("attn_layer_period", 2),
    ("attn_layer_offset", 0),
    ("expert_layer_period", 3),
    ("expert_layer_offset", 2),
)

# In CI (CI=true, as CI services set it) a missing test dependency fails the run; elsewhere the
# tests that need it are skipped, saying what is missing.
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing_dependency(reason: str) -> None:
    """Skip the calling test module, or fail it in CI."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: a missing test dependency fails, not skips)", False)
    pytest.skip(reason, allow_module_level=True)


def need_triton() -> None:
    """Module level in the kernel tests: Triton imports and can run here (CUDA, or its CPU
    interpreter, which this conftest turns on without CUDA)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        missing_dependency("Triton is not installed (it is in the test extras: .[test])")
    from jamba_ray.model import kernels

    if not kernels.available():
        missing_dependency("Triton cannot run here: no CUDA and TRITON_INTERPRET is off")


STAGE_CPUS = 0.25  # fractional CPUs so many stage actors fit the 2-core machine


@pytest.fixture(scope="session", autouse=True)
def _private_cache():
    yield
    shutil.rmtree(os.environ.pop("JAMBA_RAY_CACHE"), ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> str:
    return str(init_tiny(tmp_path_factory.mktemp("tiny-a"), TinySpec(seed=0)))


@pytest.fixture(scope="session")
def tiny_ckpt_b(tmp_path_factory) -> str:
    return str(init_tiny(tmp_path_factory.mktemp("tiny-b"), TinySpec(seed=1, overrides=LAYOUT_B)))


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()


@pytest.fixture(scope="session")
def served(tiny_ckpt, ray_session):
    """The test session's Serve app (HTTP + gRPC on loopback), started on first use."""
    from tests.serve.conftest import start_served

    yield from start_served(tiny_ckpt)


_HF_CACHE: dict[str, object] = {}


def hf_model(path: str):
    """transformers' JambaForCausalLM on the same checkpoint: the numerical reference."""
    from transformers import JambaForCausalLM

    if path not in _HF_CACHE:
        _HF_CACHE[path] = JambaForCausalLM.from_pretrained(path).eval()
    return _HF_CACHE[path]


def hf_greedy(path: str, prompt: list[int], steps: int):
    """(generated token ids, per-step logits [steps, V]) from HF generate, greedy, no EOS stop."""
    import torch

    model = hf_model(path)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
    return out.sequences[0, len(prompt) :].tolist(), torch.cat(out.logits).float()


TIE_MARGIN = 1e-4  # fp32 paths that differ in summation order agree to ~1e-6; closer calls are ties


def steps_before_tie(top2) -> int:
    """How many leading steps are clear calls: top2 [steps, 2] = the two best logits (or logprobs,
    whose gaps are the same) of each step; counting stops at the first gap under TIE_MARGIN."""
    gaps = [float(a - b) for a, b in top2]
    return next((i for i, g in enumerate(gaps) if g < TIE_MARGIN), len(gaps))


def hf_clear_greedy(path: str, prompt: list[int], steps: int) -> list[int]:
    """HF's greedy tokens up to its first near-tie: what every correct compute path produces."""
    ref, logits = hf_greedy(path, prompt, steps)
    return ref[: steps_before_tie(logits.topk(2, dim=-1).values)]


def assert_greedy_like_hf(path: str, prompt: list[int], tokens: list[int]) -> None:
    """Our greedy tokens equal HF's, position by position, up to the first step where HF's top two
    logits are within TIE_MARGIN: past a near-tie either choice is right, and the paths diverge."""
    clear = hf_clear_greedy(path, prompt, len(tokens))
    assert tokens[: len(clear)] == clear, f"{tokens} vs HF {clear} (clear calls only)"


PROMPTS = [
    [1, 5, 9, 200, 3, 77, 12],
    [1, 44, 8],
    [1, 300, 301, 302, 303, 304, 305, 306, 307, 308, 309, 310, 311, 312, 313, 314, 315, 316, 317],
    [1, 250],
]


def stage_logits(stages, msg, tokens):
    """Run stages in-process on one message; the last stage's raw logits [rows, V] (fp32)."""
    import dataclasses

    import torch

    msg = dataclasses.replace(msg, return_logits=True)
    x = torch.tensor(tokens)
    for s in stages:
        x = s.forward(msg, x)
    return torch.from_numpy(x.logits)


BLOCK = 16  # KV block size the direct-stage tests use


def table(slot: int, end: int, max_len: int) -> tuple[int, ...]:
    """In tests that drive stages directly, each slot owns a fixed run of KV blocks."""
    per = -(-max_len // BLOCK)
    return tuple(range(slot * per, slot * per + -(-end // BLOCK)))


def seg(seq_id: int, slot: int, start: int, length: int, logits="last", max_len: int = 128):
    """A segment carrying its whole block table (as a new or resumed sequence's first does)."""
    from jamba_ray.engine.messages import Segment

    return Segment(seq_id, slot, start, length, logits, blocks=table(slot, start + length, max_len))


def stage_spec(
    path: str,
    index: int,
    start: int,
    end: int,
    num_stages: int,
    slots: int = 4,
    max_len: int = 128,
    **kw,
):
    from jamba_ray.runtime.stage_spec import StageSpec

    blocks = slots * -(-max_len // BLOCK) + 1
    return StageSpec(path, index, start, end, num_stages, slots, max_len, blocks, BLOCK, **kw)
