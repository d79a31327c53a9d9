"""Offline batch jobs on Ray Data: score / classify / generate a table with the serving pipeline.

Names load on first use: the CLI reads `ScoreConfig`'s defaults without importing Ray.
"""

from importlib import import_module

_WHERE = {
    "ScoreConfig": ".score_config",
    "Job": ".job",
    "JobSummary": ".job",
    "score": ".job",
    "prepare_job": ".job",
    "execute": ".job",
    "run_job": ".job",
    "quiet_ray_data": ".progress",
}

__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_WHERE[name], __name__), name)
