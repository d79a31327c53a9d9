"""Stage actors on Ray, token-exact with transformers for any number of stages (Petals-style)."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from jamba_ray.config import EngineConfig, ModelSpec
from jamba_ray.config.capacity import Capacity
from jamba_ray.config.planner import plan
from jamba_ray.engine.messages import StepFailure, StepMessage, StepResult
from jamba_ray.runtime.pipeline import RayPipeline
from tests.conftest import BLOCK, PROMPTS, STAGE_CPUS, hf_greedy, seg, steps_before_tie

STEPS = 12


def pipeline(path, plans, slots, max_len, **options) -> RayPipeline:
    cfg = EngineConfig.build(path, num_stages=len(plans), num_cpus_per_stage=STAGE_CPUS, **options)
    blocks = slots * -(-max_len // BLOCK)
    pipe = RayPipeline(cfg, path, plans, eos_id=2)
    pipe.allocate(Capacity(slots, max_len, blocks, BLOCK))
    return pipe


def logits_of(pipe: RayPipeline, msg: StepMessage, tokens: list[int]) -> torch.Tensor:
    result = pipe.wait(pipe.submit(msg, tokens))
    return torch.tensor(result.logits)


def greedy(pipe: RayPipeline, prompts, steps):
    """Prefill all prompts in one micro-batch, then decode them together; returns tokens, logits."""
    seqs = [list(p) for p in prompts]
    segs = tuple(seg(i, i, 0, len(p), max_len=64) for i, p in enumerate(prompts))
    logits = logits_of(
        pipe, StepMessage(0, segs, return_logits=True), [t for p in prompts for t in p]
    )
    tokens, all_logits = [[] for _ in prompts], [[] for _ in prompts]
    for step in range(steps):
        for i, row in enumerate(logits):
            all_logits[i].append(row)
            tokens[i].append(int(row.argmax()))
            seqs[i].append(tokens[i][-1])
        segs = tuple(seg(i, i, len(s) - 1, 1, max_len=64) for i, s in enumerate(seqs))
        if step < steps - 1:
            msg = StepMessage(step + 1, segs, return_logits=True)
            logits = logits_of(pipe, msg, [s[-1] for s in seqs])
    return tokens, [torch.stack(rows) for rows in all_logits]


CASES = [  # (checkpoint layout, how to split it, transport, decode_graphs) on Ray actors
    # uneven explicit split; the stages bound once into a Ray Compiled Graph (auto's choice)
    ("a", dict(slices=[(0, 1), (1, 5), (5, 6)]), "compiled", False),
    ("b", dict(slices=[(0, 4), (4, 5)]), "object_store", False),  # per-task: a task per stage
    (
        "a",
        dict(stages=3),
        "p2p",
        False,
    ),  # hidden states over torch.distributed (gloo; NCCL on GPUs)
    # fixed-shape decode steps (CUDA graphs on GPUs): padded batch, bucketed KV, grouped_mm experts
    ("a", dict(stages=2), "object_store", True),
    ("b", dict(stages=2), "p2p", True),
]
# The same greedy parity for more splits, with the stages in this process (no actors: fast).
LOCAL_CASES = [
    ("a", dict(stages=1)),
    ("a", dict(stages=2)),
    ("a", dict(stages=3)),
    ("b", dict(stages=2)),
    ("b", dict(stages=3)),
]


@pytest.mark.parametrize(
    "layout, layout_kwargs, transport, graphs",
    CASES,
    ids=[f"{l}-{k}-{t}{'-graphs' if g else ''}" for l, k, t, g in CASES],
)
def test_greedy_tokens_and_logits_match_transformers(
    layout, layout_kwargs, transport, graphs, tiny_ckpt, tiny_ckpt_b, ray_session
):
    path = tiny_ckpt if layout == "a" else tiny_ckpt_b
    plans = plan(ModelSpec.from_path(path), **layout_kwargs)
    pipe = pipeline(
        path,
        plans,
        len(PROMPTS),
        64,
        transport=transport,
        decode_graphs=graphs,
        stage_slices=tuple(plan_slices(plans)),
    )
    try:
        tokens, logits = greedy(pipe, PROMPTS, STEPS)
        for i, prompt in enumerate(PROMPTS):
            ref_tokens, ref_logits = hf_greedy(path, prompt, STEPS)
            # fp32 both, summed in another order (~1e-6): tokens equal at every clear call; the
            # logits up to and at HF's first near-tie (after it the two runs may feed on others)
            clear = steps_before_tie(ref_logits.topk(2, dim=-1).values)
            assert tokens[i][:clear] == ref_tokens[:clear], f"prompt {i}"
            n = min(clear + 1, STEPS)
            torch.testing.assert_close(logits[i][:n], ref_logits[:n], atol=1e-5, rtol=0)
        stats = pipe.stats()
        assert [s["layers"] for s in stats] == [[p.start, p.end] for p in plans]
        if transport == "compiled":
            assert {s["transport"] for s in stats} == {"compiled/shm"}
        if transport == "p2p":  # every hop went point-to-point, none through the object store
            assert {s["transport"] for s in stats} == {"p2p/gloo"}
            assert [s["p2p_sent"] for s in stats[:-1]] == [STEPS] * (len(plans) - 1)
            assert [s["p2p_received"] for s in stats[1:]] == [STEPS] * (len(plans) - 1)
            hidden = ModelSpec.from_path(path).hidden_size * 4  # fp32 bytes per token
            tokens_sent = sum(map(len, PROMPTS)) + len(PROMPTS) * (STEPS - 1)
            assert stats[0]["p2p_bytes_sent"] == hidden * tokens_sent
        for s in (
            stats if graphs else ()
        ):  # every decode step took the fixed-shape path, at one shape
            assert s["decode_graph_steps"] == STEPS - 1 and s["decode_graph_shapes"] == 1
            assert (
                s["decode_graphs_captured"] == 0 and s["decode_graphs_disabled"] is None
            )  # CPU: eager
    finally:
        pipe.shutdown()


def plan_slices(plans):
    return [(p.start, p.end) for p in plans]


def test_stages_run_in_separate_processes(tiny_ckpt, ray_session):
    plans = plan(ModelSpec.from_path(tiny_ckpt), 2)
    pipe = pipeline(tiny_ckpt, plans, 2, 32)
    try:
        pids = {i["pid"] for i in pipe.info}
        assert len(pids) == 2
    finally:
        pipe.shutdown()


@pytest.mark.parametrize(
    "layout, layout_kwargs", LOCAL_CASES, ids=[f"{l}-{k}" for l, k in LOCAL_CASES]
)
def test_in_process_stages_match_transformers_for_any_split(
    layout, layout_kwargs, tiny_ckpt, tiny_ckpt_b
):
    from jamba_ray.runtime.local import LocalPipeline

    path = tiny_ckpt if layout == "a" else tiny_ckpt_b
    plans = plan(ModelSpec.from_path(path), **layout_kwargs)
    cfg = EngineConfig.build(path, num_stages=len(plans), backend="local")
    pipe = LocalPipeline(cfg, path, plans, eos_id=2)
    pipe.allocate(Capacity(len(PROMPTS), 64, len(PROMPTS) * -(-64 // BLOCK), BLOCK))
    tokens, logits = greedy(pipe, PROMPTS, STEPS)
    for i, prompt in enumerate(PROMPTS):
        ref_tokens, ref_logits = hf_greedy(path, prompt, STEPS)
        steps = steps_before_tie(ref_logits.topk(2, dim=-1).values)  # past a near-tie: either
        assert tokens[i][:steps] == ref_tokens[:steps], f"prompt {i}"
        torch.testing.assert_close(logits[i][:steps], ref_logits[:steps], atol=1e-5, rtol=0)


def test_a_compiled_graph_hands_back_stage_errors_and_keeps_running(tiny_ckpt, ray_session):
    """A stage that raises fails its step (the error named), and the graph goes on: more failing
    steps than it has buffers, then a probe and a real step still land (an exception raised into
    a Ray 2.60 graph stalls it a few steps later; stages hand errors on as values instead)."""
    plans = plan(ModelSpec.from_path(tiny_ckpt), 2)
    pipe = pipeline(tiny_ckpt, plans, 2, 32, transport="compiled")
    bad = StepMessage(1, (seg(0, 99, 0, 3, max_len=32),))  # stage 0 has 3 slots: it raises

    def run() -> list:
        failures = [pipe.wait(pipe.submit(bad, [1, 5, 9])) for _ in range(2 * pipe.num_stages + 4)]
        probe = pipe.wait(pipe.probe(1))
        ok = StepMessage(2, (seg(0, 0, 0, 3, max_len=32),), return_logits=True)
        good = pipe.wait(pipe.submit(ok, [1, 5, 9]))
        return [*failures, probe, good]

    pool = ThreadPoolExecutor(1)  # (a stalled graph fails this test instead of hanging it)
    try:
        *failures, probe, good = pool.submit(run).result(timeout=120)
        assert all(isinstance(f, StepFailure) for f in failures)
        assert failures[0].error == "ValueError: slot 99 outside the pool (0..2)"
        assert isinstance(probe, StepResult) and isinstance(good, StepResult)
        assert good.logits.shape[0] == 1  # the prompt's last row
    finally:
        pipe.shutdown()  # (tears the graph down first: a blocked call in `run` ends)
        pool.shutdown()
