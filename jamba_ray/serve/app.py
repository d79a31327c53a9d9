"""The Serve application: an ingress deployment (ingress.py) in front of one engine deployment per
served model (engine_deployment.py), as Ray Serve LLM splits them.

An engine replica is one whole pipeline: its placement group = [replica bundle] + one bundle per
stage. The ingress needs no GPU and scales on its own (`serve.ingress`). Several pipeline files
make one app serving several models; the first file's `serve` section sets the app-wide options
(ports, key, limits, ingress), each file's own `serve.autoscaling` and `replica_cpus` its engine's.
"""

from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path

from ray import serve

from ..config.engine_config import PipelineConfig
from ..config.pipeline_file import PipelineFile
from ..errors import ConfigError
from .autoscale import serve_autoscaling
from .engine_deployment import JambaEngine
from .ingress import JambaServer, api_key
from .router import request_router_config

INGRESS = "JambaServer"
ENGINE = "JambaEngine"


def served_name(config: PipelineConfig) -> str:
    if config.serve.served_model_name:
        return config.serve.served_model_name
    return "jamba-tiny" if not config.model_given else Path(config.engine.model.path).name


def engine_name(model_name: str) -> str:
    """The engine deployment of one served model (Serve names allow no '#' or '/')."""
    return f"{ENGINE}-{re.sub(r'[^A-Za-z0-9_.-]', '_', model_name)}"


def deployment(
    configs: PipelineConfig | list[PipelineConfig], engine_options: dict | None = None
) -> serve.Application:
    """Bind the app. `engine_options`: more Serve options for every engine deployment (e.g.
    `request_router_config`), over the ones the pipeline files set."""
    configs = [configs] if isinstance(configs, PipelineConfig) else list(configs)
    if not configs:
        raise ConfigError("an app needs at least one pipeline")
    first = configs[0]
    api_key(first.serve.api_key_env)  # refuse here too, before any replica starts
    engines: dict[str, tuple] = {}
    for config in configs:
        name = served_name(config)
        if name in engines:
            raise ConfigError(
                f"two pipelines serve the model name {name!r}; set serve.served_model_name"
            )
        engines[name] = (config.engine.model.path, engine_app(config, name, engine_options))
    env = _env()
    if first.serve.api_key_env:
        env[first.serve.api_key_env] = os.environ[first.serve.api_key_env]
    ingress = first.serve.ingress
    return JambaServer.options(
        name=INGRESS,
        autoscaling_config=ingress.autoscaling.serve_dict(),
        graceful_shutdown_timeout_s=first.serve.graceful_shutdown_timeout_s,
        ray_actor_options={"num_cpus": ingress.num_cpus, "runtime_env": {"env_vars": env}},
    ).bind(first, engines)


def engine_app(config: PipelineConfig, name: str, options: dict | None = None) -> serve.Application:
    """One model's engine deployment; a replica's group = [replica bundle] + a bundle per stage."""
    from ..runtime.placement import stage_bundle

    if not config.model_given:
        from ..tiny import ensure_default_tiny

        ensure_default_tiny()
    place = config.engine.placement
    bundle = stage_bundle(place, place.num_stages)
    engine = replace(config.engine, placement=replace(place, num_cpus_per_stage=bundle["CPU"]))
    bundles = [{"CPU": config.serve.replica_cpus}] + [bundle] * place.num_stages
    env = _env()
    if os.environ.get("JAMBA_RAY_REPLACEMENT_DELAY_S"):  # a test knob: slow replacement stages
        env["JAMBA_RAY_REPLACEMENT_DELAY_S"] = os.environ["JAMBA_RAY_REPLACEMENT_DELAY_S"]
    opts = config.serve
    settings = {
        "name": engine_name(name),
        "placement_group_bundles": bundles,
        "placement_group_strategy": place.strategy,
        "autoscaling_config": serve_autoscaling(opts.autoscaling),
        "request_router_config": request_router_config(
            opts.router, engine.state.block_size, engine.state.checkpoint_every
        ),
        "graceful_shutdown_timeout_s": opts.graceful_shutdown_timeout_s,
        "health_check_period_s": opts.health_check_period_s,
        "ray_actor_options": {"num_cpus": opts.replica_cpus, "runtime_env": {"env_vars": env}},
    }
    return JambaEngine.options(**{**settings, **(options or {})}).bind(engine, name)


def _env() -> dict[str, str]:
    return {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0")}


def build_app(args: dict) -> serve.Application:
    """Serve config entry point (`import_path: jamba_ray.serve.app:build_app`). `config`: one
    pipeline file, or a list of them (one model each); `model` overrides the first one's."""
    paths = args.get("config")
    paths = paths if isinstance(paths, list) else [paths]
    pipelines = [PipelineFile.load_or_default(p) for p in paths]
    model = args.get("model")
    return deployment([p.to_config(model if i == 0 else None) for i, p in enumerate(pipelines)])
