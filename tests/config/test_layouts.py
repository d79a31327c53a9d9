"""Pipeline layouts, memory fit checks, and the cluster configs, validated as specifications."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from jamba_ray.cli import main
from jamba_ray.config import EngineConfig, ModelSpec
from jamba_ray.config.fit import fit_check, require_fit
from jamba_ray.config.pipeline_file import PipelineFile
from jamba_ray.config.planner import plan
from jamba_ray.errors import ConfigError
from jamba_ray.serve.launch import serve_config

ROOT = Path(__file__).parents[2]
LAYOUTS = sorted((ROOT / "pipelines").glob("*.yaml"))
JAMBA = ModelSpec.from_path(ROOT / "pipelines" / "jamba-v0.1-config.json")


def test_the_shipped_layouts_exist_and_validate():
    names = {p.stem for p in LAYOUTS}
    assert {
        "tiny-cpu",
        "jamba-v0.1-bf16-4x80g",
        "jamba-v0.1-int8-2x80g",
        "jamba-v0.1-long-context",
    } <= names
    for path in LAYOUTS:
        pf = PipelineFile.load(path)
        assert pf.name == path.stem


def test_tiny_cpu_yaml_is_the_built_in_default():
    assert PipelineFile.load(ROOT / "pipelines" / "tiny-cpu.yaml") == PipelineFile.default()


def test_int8_layout_keeps_mamba_in_bf16_and_long_context_is_256k():
    int8 = PipelineFile.load(ROOT / "pipelines" / "jamba-v0.1-int8-2x80g.yaml")
    assert int8.engine.model.quantization == "int8" and int8.engine.model.dtype == "bfloat16"
    long = PipelineFile.load(ROOT / "pipelines" / "jamba-v0.1-long-context.yaml")
    assert long.engine.model.max_model_len == 262144
    from jamba_ray.config.capacity import derive_capacity

    cfg = long.to_config().engine
    cap = derive_capacity(JAMBA, cfg, plan(JAMBA, 4, dtype="bf16"))
    assert cap.concurrent(262144) >= 32 and cap.concurrent(1024) == 128  # paged: mixed lengths


@pytest.mark.parametrize(
    "text, field",
    [
        ("engine: {placement: {num_stages: two}}", "engine.placement.num_stages"),
        ("engine: {placement: {num_gpus_per_stage: -1}}", "engine.placement.num_gpus_per_stage"),
        ("engine: {placement: {strategy: EVERYWHERE}}", "engine.placement.strategy"),
        ("engine: {scheduler: {max_num_seqs: 0}}", "engine.scheduler.max_num_seqs"),
        ("engine: {model: {quantization: int4}}", "engine.model.quantization"),
        ("engine: {state: {state_pool: 3}}", "engine.state.state_pool"),
        ("serve: {autoscaling: {max_replica: 3}}", "serve.autoscaling.max_replica"),
    ],
)
def test_a_bad_field_is_named_in_the_error(tmp_path, text, field):
    p = tmp_path / "bad.yaml"
    p.write_text(f"name: x\n{text}\n")
    with pytest.raises(ConfigError, match=f"field '{field}'"):
        PipelineFile.load(p)


@pytest.mark.parametrize("path", LAYOUTS, ids=[p.stem for p in LAYOUTS])
def test_plan_fits_every_shipped_layout(path, capsys):
    assert main(["plan", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "fits" in out and " NO" not in out


def test_bf16_jamba_on_four_stages_is_about_24_gib_of_weights_each():
    pf = PipelineFile.load(ROOT / "pipelines" / "jamba-v0.1-bf16-4x80g.yaml")
    cfg = pf.to_config("ai21labs/Jamba-v0.1").engine
    fits = fit_check(JAMBA, cfg, plan(JAMBA, 4, dtype="bf16"))
    assert [round(f.weights / 2**30, 2) for f in fits] == [24.26, 23.76, 23.76, 24.26]
    assert all(f.fits for f in fits)


def test_int8_halves_the_expert_weights_but_not_mamba():
    full = EngineConfig.build("x", dtype="bfloat16", max_num_seqs=1, max_model_len=1024)
    plans = plan(JAMBA, 2, dtype="bf16")
    q = fit_check(JAMBA, full.with_options(quantization="int8"), plans)
    full = fit_check(JAMBA, full, plans)
    ratio = sum(f.weights for f in q) / sum(f.weights for f in full)
    assert 0.5 < ratio < 0.6


def test_a_layout_that_does_not_fit_is_refused(tmp_path, capsys):
    p = tmp_path / "one-gpu.yaml"
    p.write_text(
        yaml.safe_dump(
            {
                "name": "one-gpu",
                "config_json": str(ROOT / "pipelines" / "jamba-v0.1-config.json"),
                "engine": {
                    "model": {"path": "ai21labs/Jamba-v0.1", "dtype": "bf16"},
                    "placement": {"num_gpus_per_stage": 1, "device_memory_gib": 80},
                },
            }
        )
    )
    assert main(["plan", "--config", str(p)]) == 2
    err = capsys.readouterr().err
    assert "does not fit" in err and "stage 0" in err


def test_the_engine_runs_the_same_fit_check_before_starting_stages(tiny_ckpt):
    from jamba_ray.engine.core import EngineCore

    with pytest.raises(ConfigError, match="does not fit"):
        EngineCore(
            EngineConfig.build(tiny_ckpt, num_stages=2, device_memory_gib=0.001, backend="local")
        )
    spec = ModelSpec.from_path(tiny_ckpt)
    require_fit(
        fit_check(spec, EngineConfig.build(tiny_ckpt, device_memory_gib=1.0), plan(spec, 2))
    )


def test_serve_configs_are_accepted_by_rays_schema():
    from ray.serve.schema import ServeDeploySchema

    for path in LAYOUTS:
        cfg = serve_config(str(path), PipelineFile.load(path))
        schema = ServeDeploySchema.model_validate(cfg)
        assert schema.applications[0].import_path == "jamba_ray.serve.app:build_app"


def test_the_rayservice_embeds_a_valid_serve_config_for_a_real_pipeline():
    from ray.serve.schema import ServeDeploySchema

    svc = yaml.safe_load((ROOT / "clusters" / "kuberay-rayservice.yaml").read_text())
    assert svc["kind"] == "RayService"
    serve_cfg = ServeDeploySchema.model_validate(yaml.safe_load(svc["spec"]["serveConfigV2"]))
    app = serve_cfg.applications[0]
    pipeline = ROOT / app.args["config"].removeprefix("/app/")
    assert PipelineFile.load(pipeline).name == "jamba-v0.1-bf16-4x80g"
    groups = svc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert (
        groups[0]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
        == "4"
    )


def test_cluster_launcher_yaml_parses():
    cfg = yaml.safe_load((ROOT / "clusters" / "ray-cluster-gpu.yaml").read_text())
    assert cfg["available_node_types"]["gpu_4x80g"]["resources"]["GPU"] == 4
    assert cfg["head_node_type"] in cfg["available_node_types"]


def test_the_routed_two_pipeline_config_uses_the_prefix_router_and_fill_autoscaling():
    from ray.serve.schema import ServeDeploySchema

    cfg = yaml.safe_load((ROOT / "clusters" / "serve-2-pipelines-routed.yaml").read_text())
    app = ServeDeploySchema.model_validate(cfg).applications[0]
    serve_opts = PipelineFile.load(ROOT / app.args["config"]).to_config().serve
    assert serve_opts.router.policy == "prefix"
    assert serve_opts.autoscaling.min_replicas == 2 and serve_opts.autoscaling.target == "slots"
