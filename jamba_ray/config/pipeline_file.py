"""`pipelines/*.yaml`: a pipeline layout, that is the config tree as a file.

A layout nests the tree's sections under their own names: `engine` holds `model`, `state`,
`scheduler`, `placement`, `compute` and `recovery`, field for field as `EngineConfig`, and `serve`
holds `ServeConfig`'s fields, `autoscaling` and `router`. Every option can be set; one left out is
the tree's default. `to_config()` turns a validated file into the frozen `PipelineConfig`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import ConfigError
from .engine_config import PipelineConfig, section_of
from .file_sections import EngineSection, ServeSection

# What `serve` runs without a file, and `build_app` without a `config` arg:
# `pipelines/tiny-cpu.yaml` states the same. The tiny model in 2 CPU stages, gRPC on.
DEFAULT_LAYOUT: dict[str, Any] = {
    "name": "tiny-cpu",
    "engine": {
        "model": {"path": None, "max_model_len": 1024},
        "state": {"state_memory_gib": 1},
        "scheduler": {"max_num_seqs": 32},
        "placement": {"num_stages": 2, "num_cpus_per_stage": 0.5},
        "compute": {"threads_per_stage": 2},
    },
    "serve": {"grpc_port": 9000, "autoscaling": {"target_ongoing_requests": 16}},
}

# Top-level keys of the flat layouts before the tree, and where they are now (said in errors).
MOVED = {
    "model": "engine.model.path",
    "stages": "engine.placement.num_stages or stage_slices",
    "placement": "engine.placement.strategy",
    "resources": "engine.placement: num_cpus_per_stage, num_gpus_per_stage, ...",
    "autoscaling": "serve.autoscaling",
}


class PipelineFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    config_json: str | None = Field(
        None,
        description="config.json for planning when the model is not local (relative to this file)",
    )
    engine: EngineSection = Field(default_factory=EngineSection)
    serve: ServeSection = Field(default_factory=ServeSection)

    @classmethod
    def default(cls) -> PipelineFile:
        """The one default layout (`DEFAULT_LAYOUT`)."""
        return cls.model_validate(DEFAULT_LAYOUT)

    @classmethod
    def load_or_default(cls, path: str | Path | None) -> PipelineFile:
        """The layout at `path`, else the default one (`serve` and `build_app` without a file)."""
        return cls.load(path) if path else cls.default()

    @classmethod
    def load(cls, path: str | Path) -> PipelineFile:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"no pipeline file at {p}")
        try:
            loaded = cls.model_validate(yaml.safe_load(p.read_text()) or {})
        except ValidationError as e:
            raise ConfigError(f"{p}: {explain(e)}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{p} is not valid YAML: {e}") from None
        if loaded.config_json:
            resolved = str((p.parent / loaded.config_json).resolve())
            loaded = loaded.model_copy(update={"config_json": resolved})
        return loaded

    def with_overrides(self, **changes: Any) -> PipelineFile:
        """Options changed (CLI flags over a file): dotted paths as `serve.port`, or engine options
        by their flat names as `EngineConfig.build` takes them (`num_stages`, `max_num_seqs`)."""
        data = self.model_dump()
        for key, value in changes.items():
            path = key if "." in key else f"engine.{section_of(key)}.{key}"
            *parents, leaf = path.split(".")
            node = data
            for k in parents:
                if not isinstance(node.get(k), dict):
                    raise ConfigError(f"no section {k!r} in {path!r}")
                node = node[k]
            node[leaf] = value
        try:
            return type(self).model_validate(data)
        except ValidationError as e:
            raise ConfigError(explain(e)) from None

    def model_spec_source(self) -> str:
        """Where `plan` reads config.json: a local model dir, else `config_json`."""
        model = self.engine.model.path
        if model and Path(model).expanduser().is_dir():
            return model
        if self.config_json:
            return self.config_json
        if model is None:
            from ..tiny import ensure_default_tiny

            return str(ensure_default_tiny())
        raise ConfigError(
            f"model {model!r} is not a local directory; set config_json to plan it offline"
        )

    def to_config(self, model: str | None = None) -> PipelineConfig:
        """The frozen tree; `model` overrides the file's (the tiny default when both are unset)."""
        path = model or self.engine.model.path
        if path is None:
            from ..tiny import default_tiny_dir

            path = str(default_tiny_dir())
        given = model is not None or self.engine.model.path is not None
        return PipelineConfig(self.name, self.engine.to_config(path), self.serve.to_config(), given)


def explain(e: ValidationError) -> str:
    """Each error as `field 'engine.placement.num_stages': why`."""
    parts = []
    for err in e.errors():
        where = ".".join(str(x) for x in err["loc"]) or "(top level)"
        parts.append(f"field '{where}': {err['msg']}{_moved(err)}")
    return "; ".join(parts)


def _moved(err: dict) -> str:
    """For a key of the old flat layouts, where it is now."""
    if err["type"] != "extra_forbidden" or len(err["loc"]) != 1:
        return ""
    key = str(err["loc"][0])
    if key in MOVED:
        return f" (now {MOVED[key]})"
    try:
        return f" (now engine.{section_of(key)}.{key})"
    except ConfigError:
        return ""
