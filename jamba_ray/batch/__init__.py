"""Offline batch jobs on Ray Data: score / classify / generate a table with the serving pipeline."""

from .job import Job, JobSummary, execute, prepare_job, run_job, score
from .progress import quiet_ray_data
from .scorer import ScoreConfig

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
