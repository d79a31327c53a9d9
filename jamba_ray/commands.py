"""What each `jamba-ray` subcommand does; `cli.py` parses the arguments and calls these."""

from __future__ import annotations

import contextlib
import json
import sys

from .errors import ConfigError


def init_tiny(a) -> int:
    from .tiny import TinySpec, init_tiny

    spec = TinySpec(a.preset, a.seed, a.max_shard_size, a.classifier)
    out = init_tiny(a.dir, spec, say=lambda msg: print(f"init-tiny: {msg}", flush=True))
    files = [f for f in out.iterdir() if f.is_file()]
    size = sum(f.stat().st_size for f in files) / 2**20
    print(f"wrote a {a.preset} Jamba checkpoint to {out} ({len(files)} files, {size:.1f} MiB)")
    return 0


def plan(a) -> int:
    from .config.planner import format_plan, plan
    from .config.spec import ModelSpec

    if a.config:
        return plan_config(a.config)
    if not a.model:
        raise ConfigError("give --model DIR_OR_CONFIG or --config pipelines/X.yaml")
    spec = ModelSpec.from_path(a.model)
    slices = json.loads(a.slices) if a.slices else None
    dtype = a.dtype or checkpoint_dtype(a.model)
    stages = plan(spec, a.stages, slices, dtype, a.balance)
    print(f"{a.model}: {dtype} weights, {len(stages)} stage{'s' if len(stages) > 1 else ''}\n")
    print(format_plan(spec, stages))
    return 0


def checkpoint_dtype(path: str) -> str:
    """The dtype a checkpoint's config.json names (`torch_dtype`, or `dtype`), else float32."""
    from pathlib import Path

    p = Path(path)
    cfg = json.loads((p / "config.json" if p.is_dir() else p).read_text())
    return cfg.get("torch_dtype") or cfg.get("dtype") or "float32"


def plan_config(path: str) -> int:
    """Partition + memory fit of a pipeline file; non-zero exit when a stage does not fit."""
    from .config.capacity import derive_capacity, format_capacity
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
    model = pf.engine.model.path or "tiny default"
    print(f"pipeline {pf.name}: {model}, {dtype}{int8}, {len(plans)} stages\n")
    print(format_plan(spec, stored_weights(spec, plans, dtype, cfg.model.quantization)), end="\n\n")
    fits = fit_check(spec, cfg, plans)
    print(format_fit(fits))
    print(format_capacity(derive_capacity(spec, cfg, plans)))
    require_fit(fits)
    return 0


def stored_weights(spec, plans, dtype: str, quantization: str | None):
    """The plans with the bytes their weights take as stored (int8 linears are smaller), so the
    partition table and the fit table agree."""
    import dataclasses

    from .config.fit import stage_weight_bytes

    last = len(plans) - 1
    return [
        dataclasses.replace(
            p, param_bytes=stage_weight_bytes(spec, p, dtype, quantization, p.index == last)
        )
        for p in plans
    ]


def generate(a) -> int:
    from .engine.llm import LLM
    from .engine.sampling_params import SamplingParams
    from .logs import quiet_ray

    quiet_ray()

    llm = LLM(
        a.model,
        num_stages=a.stages,
        num_cpus_per_stage=a.cpus_per_stage,
        dtype=a.dtype,
        transport=a.transport,
        decode_graphs=a.decode_graphs,
    )
    try:
        params = SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, seed=a.seed)
        for out in llm.generate(a.prompt, params):
            c = out.outputs[0]
            print(
                json.dumps(
                    {
                        "prompt": out.prompt,
                        "text": c.text,
                        "token_ids": c.token_ids,
                        "finish_reason": c.finish_reason,
                    }
                )
            )
    finally:
        llm.shutdown()
    return 0


def pipeline_file(a):
    """The layout `serve` runs: the file (else the default layout) with the flags given over it."""
    from .config.pipeline_file import PipelineFile

    flags = {
        "num_stages": a.stages,
        "transport": a.transport,
        "decode_graphs": a.decode_graphs or None,
        "serve.host": a.host,
        "serve.port": a.port,
        "serve.grpc_port": a.grpc_port,
        "serve.autoscaling.min_replicas": a.min_replicas,
        "serve.autoscaling.max_replicas": a.max_replicas,
        "serve.autoscaling.target_ongoing_requests": a.target_ongoing_requests,
        "serve.served_model_name": a.served_model_name,
        "serve.api_key_env": "JAMBA_RAY_API_KEY" if a.api_key else None,
    }
    given = {k: v for k, v in flags.items() if v is not None}
    if a.stages is not None:
        given["stage_slices"] = None  # a stage count replaces the file's explicit slices
    first = a.config[0] if a.config else None
    return PipelineFile.load_or_default(first).with_overrides(**given)


def serve_configs(a) -> list:
    """What `serve` deploys: the first pipeline (the flags and --model apply to it; its serve
    section is the app's), then one more model per further --config, as its file says."""
    from .config.pipeline_file import PipelineFile

    more = [PipelineFile.load(p).to_config() for p in (a.config or [])[1:]]
    return [serve_pipeline(a).to_config(a.model), *more]


def serve(a) -> int:
    """Checks first (nothing started yet), then the server runs in a detached child process
    (`foreground.run_detached`) so that signals for this process group never reach Ray's."""
    import os

    from .foreground import is_detached_child, run_detached
    from .serve.preflight import check_model, check_ports, check_resources, local_resources

    if a.api_key:
        os.environ["JAMBA_RAY_API_KEY"] = a.api_key
    configs = serve_configs(a)
    if not is_detached_child():
        opts = configs[0].serve
        local = (a.address or os.environ.get("RAY_ADDRESS")) is None  # this machine's ports, CPUs
        if local:
            check_ports(opts.host, {"--port": opts.port, "--grpc-port": opts.grpc_port})
        for config in configs:
            check_model(config)
            if local and config.engine.placement.num_cpus_per_stage is not None:
                check_resources(config, local_resources(), complete=False)
        return run_detached([sys.executable, "-m", "jamba_ray", *a.argv])
    return serve_foreground(configs, a.address)


def serve_pipeline(a):
    pipeline = pipeline_file(a)
    if a.no_grpc:
        pipeline = pipeline.model_copy(
            update={"serve": pipeline.serve.model_copy(update={"grpc_port": None})}
        )
    return pipeline


def serve_foreground(configs: list, address: str | None) -> int:
    """Start Ray (its gRPC proxy bound to the server's host), check the cluster can hold each
    model's replica, deploy, and serve until SIGINT / SIGTERM."""
    import ray

    from .foreground import interrupt_on_signals, shutdown_quietly, sleep_forever
    from .logs import quiet_ray
    from .serve.grpc_bind import runtime_env
    from .serve.launch import start
    from .serve.preflight import check_resources, cluster_resources

    interrupt_on_signals()
    opts, serving = configs[0].serve, False
    try:
        quiet_ray()
        ray.init(address=address, log_to_driver=False, runtime_env=runtime_env(opts.host))
        interrupt_on_signals()  # again: Ray's core worker installs its own SIGTERM handler
        for config in configs:
            check_resources(config, cluster_resources())
            print(
                f"jamba-ray: deploying {config.engine.placement.num_stages} stage(s) of "
                f"{config.engine.model.path}; each stage loads its weights first",
                flush=True,
            )
        serving = True
        start(configs)
        print(
            f"jamba-ray: serving on http://{opts.host}:{opts.port}/v1"
            + (f" and gRPC {opts.host}:{opts.grpc_port}" if opts.grpc_port else "")
            + " (Ctrl-C or SIGTERM stops)",
            flush=True,
        )
        sleep_forever()
    except KeyboardInterrupt:
        print("jamba-ray: stopping (draining Serve, then Ray)", flush=True)
    finally:
        shutdown_quietly(serving)
    return 0


def serve_config(a) -> int:
    import yaml

    from .config.pipeline_file import PipelineFile
    from .serve.launch import serve_config

    paths = a.config if len(a.config) > 1 else a.config[0]
    print(yaml.safe_dump(serve_config(paths, PipelineFile.load(a.config[0])), sort_keys=False))
    return 0


def score_config(a):
    """The job `score` runs: its flags as job fields and flat engine options."""
    from .batch.score_config import ScoreConfig

    sampling = {"max_tokens": a.max_tokens, "temperature": a.temperature}
    if a.seed is not None:
        sampling["seed"] = a.seed
    return ScoreConfig.build(
        a.model,
        task=a.task,
        text_column=a.text_column,
        id_column=a.id_column,
        too_long=a.too_long,
        token_logprobs=a.token_logprobs,
        sampling=sampling,
        num_stages=a.stages,
        num_cpus_per_stage=a.cpus_per_stage,
        max_model_len=a.max_model_len,
        max_batched_tokens=a.max_batched_tokens,
    )


def score(a) -> int:
    from .batch import execute, prepare_job, quiet_ray_data
    from .logs import drop_native_lines, quiet_ray
    from .runtime.pipeline import ensure_ray

    cfg = score_config(a)
    job = prepare_job(a.input, a.output, cfg, retry_errors=a.retry_errors)  # before Ray starts
    print(job.line(), file=sys.stderr, flush=True)
    quiet = contextlib.nullcontext() if a.verbose else drop_native_lines()
    with quiet:
        if job.pending:
            quiet_ray()
            ensure_ray(a.address)
            if not a.verbose:
                quiet_ray_data()
        summary = execute(job, a.pipelines, a.batch_size, a.progress_every)
    print(f"jamba-ray score: {summary.line()}; output in {a.output}")
    return 0
