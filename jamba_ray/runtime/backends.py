"""The pipeline backends a config can name (`placement.backend`), registered with the engine.

The engine drives a `Pipeline` and imports no runtime module; the package imports this one, so
both names are there before any engine starts. Ray and torch load only when a pipeline is built.
"""

from __future__ import annotations

from ..engine.pipeline_api import Pipeline, register_backend
from ..engine.tier_api import PrefixTier, register_tier


def ray_pipeline(*args) -> Pipeline:
    """A Ray actor per stage (`runtime/pipeline.py`)."""
    from .pipeline import RayPipeline

    return RayPipeline(*args)


def local_pipeline(*args) -> Pipeline:
    """Every stage in this process, no Ray (`runtime/local.py`)."""
    from .local import LocalPipeline

    return LocalPipeline(*args)


register_backend("ray", ray_pipeline)
register_backend("local", local_pipeline)


def ray_tier(config, pipeline) -> PrefixTier:
    """The cluster prefix tier: a detached actor (`runtime/prefix_tier.py`)."""
    from .prefix_tier import RayTierClient

    return RayTierClient(config, pipeline)


register_tier("ray", ray_tier)
