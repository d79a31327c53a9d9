"""Transport `compiled`: the stages bound once into a Ray Compiled Graph (as vLLM's Ray
pipeline-parallel backend does), so a step is one write into the graph and one read out of it.

    InputNode (msg, token ids) -> stage 0.step -> ... -> stage S-1.step
    outputs: [the last stage's StepResult, stage 0's exports, ..., stage S-1's exports]

Every stage reads the message from the graph's input channel; hidden states go from stage to stage
through its channels (shared memory between CPU stages, NCCL between stages with a GPU each); the
recovery exports come back as outputs of the same execution, so no task is submitted per step.

One thread owns the graph: Ray's CompiledDAG is not thread-safe, and the engine drives it from a
blocking loop (`LLM`) or an asyncio loop (`AsyncEngine`, whose blocking recovery runs in another
thread). Every call runs on that thread in order; a blocking caller waits on its future, an asyncio
one awaits it, so one graph (compiled without `enable_asyncio`) serves both. The thread's calls
run in an empty context, as `pipeline.call` submits tasks: the graph's execution loops are actor
tasks submitted when it compiles, and a Serve request's context would make them that request's
children, cancelled with it.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import ray

from ..engine.messages import StepMessage

log = logging.getLogger(__name__)

WAIT_FOREVER = -1  # reading a result: a stage that dies closes the graph's channels instead
# Writing a step in waits only for stage 0 to let go of the buffer it read one round of buffers
# ago; longer than this, the graph is stuck. (-1 would not wait at all: Ray 2.60 clamps what is
# left of a write's timeout at 0.)
SUBMIT_TIMEOUT_S = 600.0


@dataclass(frozen=True, slots=True)
class GraphStep:
    """The handle `submit` returns: the message, the future of the execution's output refs, and
    the graph it went into (a step that outlives its graph fails when waited on)."""

    msg: StepMessage
    refs: Future
    chain: CompiledChain


class CompiledChain:
    def __init__(self, stages: list, max_inflight: int, on_device: bool):
        """`max_inflight`: executions submitted and not yet read (the engine keeps one per stage
        in flight, and a health probe may come on top); `on_device`: hidden states stay on the
        GPU and go over NCCL (a GPU per stage), else they cross in host memory."""
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="jamba-cgraph")
        self.graph = None
        self.broken = False  # an execution failed in Ray (a stage died): the graph is gone
        try:
            self._on(self._compile, stages, max_inflight, on_device).result()
        except BaseException:  # (a stage died before or while it compiled)
            self.close()
            raise

    def _on(self, fn, *args) -> Future:
        return self.pool.submit(contextvars.Context().run, fn, *args)

    def _compile(self, stages: list, max_inflight: int, on_device: bool) -> None:
        from ray.dag import InputNode, MultiOutputNode

        with InputNode() as inp:
            x, exports = inp[1], []
            for i, stage in enumerate(stages):
                node = stage.step.options(num_returns=2).bind(inp[0], x, on_device)
                x = node[0]
                if on_device and i < len(stages) - 1:
                    x = x.with_tensor_transport("accelerator")  # NCCL, no host copy
                exports.append(node[1])
            dag = MultiOutputNode([x, *exports])
        self.graph = dag.experimental_compile(
            _submit_timeout=SUBMIT_TIMEOUT_S, _max_inflight_executions=max_inflight
        )

    def submit(self, msg: StepMessage, x: np.ndarray) -> GraphStep:
        return GraphStep(msg, self._on(self._execute, msg, x), self)

    def _execute(self, msg: StepMessage, x: np.ndarray) -> list:
        try:
            return self.graph.execute(msg, x)
        except Exception:
            self.broken = True
            raise

    def wait(self, step: GraphStep) -> list:
        """[StepResult or StageError, stage 0's exports, ...]; raises a RayError when Ray lost
        the execution (a stage died)."""
        return self._on(self._get, step).result()

    async def wait_async(self, step: GraphStep) -> list:
        return await asyncio.wrap_future(self._on(self._get, step))

    def _get(self, step: GraphStep) -> list:
        refs = step.refs.result()  # (done: it ran earlier on this thread; raises what it raised)
        try:
            return ray.get(refs, timeout=WAIT_FOREVER)
        except Exception:
            self.broken = True
            raise

    def close(self) -> None:
        """Tear the graph down (its execution loops end; the actors can run other tasks again).
        From the calling thread: the graph thread may be blocked reading, and closing the
        channels is what frees it."""
        if self.graph is not None:
            try:
                self.graph.teardown()
            except Exception as e:  # (a stage that died makes its part of the teardown fail)
                log.warning("compiled graph teardown: %s", e)
        self.pool.shutdown(wait=False)  # (calls still queued run, and fail: the graph is gone)
