"""Offline batch jobs on Ray Data: score / classify / generate a table with the serving pipeline."""

from .job import JobSummary, run_job, score
from .scorer import ScoreConfig

__all__ = ["ScoreConfig", "JobSummary", "score", "run_job"]
