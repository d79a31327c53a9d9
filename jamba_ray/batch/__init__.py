"""Offline batch jobs on Ray Data: score / classify / generate a table with the serving pipeline."""

from ..config.score_config import ScoreConfig
from .job import Job, JobSummary, execute, prepare_job, run_job, score
from .progress import quiet_ray_data

__all__ = [
    "ScoreConfig",
    "Job",
    "JobSummary",
    "score",
    "prepare_job",
    "execute",
    "run_job",
    "quiet_ray_data",
]
