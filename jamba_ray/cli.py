"""`jamba-ray` (same as `python -m jamba_ray`): init-tiny, plan, generate, serve, score."""

from __future__ import annotations

import argparse
import json
import sys

from .config.engine_config import TRANSPORTS
from .errors import ConfigError, JambaRayError


def _init_tiny(a) -> int:
    from .tiny import TinySpec, init_tiny

    out = init_tiny(a.dir, TinySpec(a.preset, a.seed, a.max_shard_size, a.classifier))
    print(f"wrote a {a.preset} Jamba checkpoint to {out}")
    return 0


def _plan(a) -> int:
    from .config.planner import format_plan, plan
    from .config.spec import ModelSpec

    if a.config:
        return _plan_config(a.config)
    if not a.model:
        raise ConfigError("give --model DIR_OR_CONFIG or --config pipelines/X.yaml")
    spec = ModelSpec.from_path(a.model)
    slices = json.loads(a.slices) if a.slices else None
    stages = plan(spec, a.stages, slices, a.dtype, a.balance)
    print(format_plan(spec, stages))
    return 0


def _plan_config(path: str) -> int:
    """Partition + memory fit of a pipeline file; non-zero exit when a stage does not fit."""
    from .config.fit import fit_check, format_fit, require_fit
    from .config.pipeline_file import PipelineFile
    from .config.planner import format_plan, plan
    from .config.spec import ModelSpec

    pf = PipelineFile.load(path)
    spec = ModelSpec.from_path(pf.model_spec_source())
    cfg = pf.to_config().engine
    place, dtype = cfg.placement, cfg.model.dtype
    slices = [tuple(s) for s in place.stage_slices] if place.stage_slices else None
    plans = plan(spec, place.num_stages, slices, dtype, place.balance)
    int8 = f", int8 weights (Mamba in {dtype})" if cfg.model.quantization else ""
    print(f"pipeline {pf.name}: {pf.model or 'tiny default'}, {dtype}{int8}, {len(plans)} stages\n")
    print(format_plan(spec, plans), end="\n\n")
    fits = fit_check(spec, cfg, plans)
    print(format_fit(fits))
    require_fit(fits)
    return 0


def _generate(a) -> int:
    from .engine.llm import LLM
    from .engine.sampling_params import SamplingParams

    llm = LLM(a.model, num_stages=a.stages, num_cpus_per_stage=a.cpus_per_stage, dtype=a.dtype,
              transport=a.transport, decode_graphs=a.decode_graphs)
    try:
        params = SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, seed=a.seed)
        for out in llm.generate(a.prompt, params):
            c = out.outputs[0]
            print(json.dumps({"prompt": out.prompt, "text": c.text, "token_ids": c.token_ids,
                              "finish_reason": c.finish_reason}))
    finally:
        llm.shutdown()
    return 0


def _pipeline(a):
    from .config.pipeline_file import PipelineFile

    base = PipelineFile.load(a.config) if a.config else PipelineFile.default()
    return base.with_overrides(**{
        "stages": a.stages, "transport": a.transport, "decode_graphs": a.decode_graphs or None,
        "serve.host": a.host, "serve.port": a.port,
        "serve.grpc_port": a.grpc_port,
        "autoscaling.min_replicas": a.min_replicas, "autoscaling.max_replicas": a.max_replicas,
        "autoscaling.target_ongoing_requests": a.target_ongoing_requests,
        "serve.served_model_name": a.served_model_name,
        "serve.api_key_env": "JAMBA_RAY_API_KEY" if a.api_key else None,
    })


def _serve(a) -> int:
    import os

    from .runtime.pipeline import ensure_ray
    from .serve.launch import start

    if a.api_key:
        os.environ["JAMBA_RAY_API_KEY"] = a.api_key
    pipeline = _pipeline(a)
    if a.no_grpc:
        pipeline = pipeline.model_copy(update={"serve": pipeline.serve.model_copy(update={"grpc_port": None})})
    ensure_ray(a.address)
    start(pipeline.to_config(a.model))
    opts = pipeline.serve
    print(f"jamba-ray: serving on http://{opts.host}:{opts.port}/v1"
          + (f" and gRPC {opts.host}:{opts.grpc_port}" if opts.grpc_port else "") + " (Ctrl-C stops)",
          flush=True)
    import time

    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        from ray import serve

        serve.shutdown()
    return 0


def _serve_config(a) -> int:
    import yaml

    from .config.pipeline_file import PipelineFile
    from .serve.launch import serve_config

    print(yaml.safe_dump(serve_config(a.config, PipelineFile.load(a.config)), sort_keys=False))
    return 0


def _score(a) -> int:
    from .batch import ScoreConfig, run_job
    from .runtime.pipeline import ensure_ray

    sampling = {"max_tokens": a.max_tokens, "temperature": a.temperature}
    if a.seed is not None:
        sampling["seed"] = a.seed
    cfg = ScoreConfig(model=a.model, task=a.task, text_column=a.text_column, id_column=a.id_column,
                      num_stages=a.stages, num_cpus_per_stage=a.cpus_per_stage, too_long=a.too_long,
                      token_logprobs=a.token_logprobs, max_model_len=a.max_model_len,
                      max_batched_tokens=a.max_batched_tokens, sampling=sampling)
    ensure_ray(a.address)
    summary = run_job(a.input, a.output, cfg, pipelines=a.pipelines, batch_size=a.batch_size)
    print(f"jamba-ray score: {summary.line()}; output in {a.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jamba-ray", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("init-tiny", help="write a tiny random Jamba checkpoint + tokenizer")
    t.add_argument("dir")
    t.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--max-shard-size", default="200KB")
    t.add_argument("--classifier", type=int, default=0, metavar="K",
                   help="also write a K-label sequence-classification head (score.weight)")
    t.set_defaults(fn=_init_tiny)

    pl = sub.add_parser("plan", help="print the per-stage partition table (no weights needed)")
    pl.add_argument("--model", help="checkpoint dir or config.json")
    pl.add_argument("--config", help="pipelines/*.yaml: also checks each stage's memory fit")
    pl.add_argument("--stages", type=int, default=1)
    pl.add_argument("--slices", help='explicit slices as JSON, e.g. "[[0,3],[3,8]]"')
    pl.add_argument("--dtype", default="bf16")
    pl.add_argument("--balance", default="params", choices=["params", "flops"])
    pl.set_defaults(fn=_plan)

    g = sub.add_parser("generate", help="generate text for one or more prompts")
    g.add_argument("--model", default=None, help="checkpoint dir or hub id (default: the tiny model)")
    g.add_argument("--stages", type=int, default=2)
    g.add_argument("--prompt", action="append", required=True)
    g.add_argument("--max-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--dtype", default="float32")
    g.add_argument("--cpus-per-stage", type=float, default=None,
                   help="CPUs reserved per stage (default: an equal share of the free CPUs, at most 1)")
    g.add_argument("--transport", default="auto", choices=TRANSPORTS, help="hidden states between stages")
    g.add_argument("--decode-graphs", action="store_true", help="fixed-shape decode steps (CUDA graphs on GPUs)")
    g.set_defaults(fn=_generate)

    s = sub.add_parser("serve", help="serve over HTTP (OpenAI API) and gRPC with Ray Serve")
    s.add_argument("--model", default=None, help="checkpoint dir or hub id (default: the pipeline's, "
                   "else the auto-created tiny model)")
    s.add_argument("--config", default=None, help="pipelines/*.yaml (default: the built-in tiny-cpu)")
    s.add_argument("--stages", type=int, default=None)
    s.add_argument("--transport", default=None, choices=TRANSPORTS, help="hidden states between stages "
                   "(default: the pipeline's, auto = p2p between GPU stages)")
    s.add_argument("--decode-graphs", action="store_true", help="fixed-shape decode steps (CUDA graphs on GPUs)")
    s.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=None)
    s.add_argument("--grpc-port", type=int, default=None, help="gRPC proxy port (default 9000)")
    s.add_argument("--no-grpc", action="store_true", help="do not start the gRPC proxy")
    s.add_argument("--min-replicas", type=int, default=None)
    s.add_argument("--max-replicas", type=int, default=None)
    s.add_argument("--target-ongoing-requests", type=float, default=None)
    s.add_argument("--served-model-name", default=None)
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (HTTP and gRPC)")
    s.add_argument("--address", default=None, help="Ray cluster address (default: local)")
    s.set_defaults(fn=_serve)

    b = sub.add_parser("score", help="offline batch job on Ray Data: loglik / classify / generate")
    b.add_argument("--model", required=True)
    b.add_argument("--input", required=True, help="JSONL or Parquet (any filesystem Ray Data reads)")
    b.add_argument("--output", required=True, help="directory of Parquet parts (rerun resumes)")
    b.add_argument("--task", default="loglik", choices=["loglik", "classify", "generate"])
    b.add_argument("--text-column", default="text")
    b.add_argument("--id-column", default="id", help="row key for resuming")
    b.add_argument("--pipelines", type=int, default=1, help="actor pool size (one pipeline each)")
    b.add_argument("--batch-size", type=int, default=16)
    b.add_argument("--stages", type=int, default=1)
    b.add_argument("--cpus-per-stage", type=float, default=0.5)
    b.add_argument("--max-model-len", type=int, default=None)
    b.add_argument("--max-batched-tokens", type=int, default=256, help="prefill chunk size")
    b.add_argument("--too-long", default="error", choices=["error", "truncate"])
    b.add_argument("--token-logprobs", action="store_true")
    b.add_argument("--max-tokens", type=int, default=16, help="generate: tokens per row")
    b.add_argument("--temperature", type=float, default=0.0)
    b.add_argument("--seed", type=int, default=None)
    b.add_argument("--address", default=None)
    b.set_defaults(fn=_score)

    sc = sub.add_parser("serve-config", help="print a Serve config (serve run/deploy, KubeRay) for a pipeline")
    sc.add_argument("--config", required=True)
    sc.set_defaults(fn=_serve_config)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except JambaRayError as e:
        print(f"jamba-ray: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
