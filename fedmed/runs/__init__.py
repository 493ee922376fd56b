"""Run directories: resolved config, metrics, checkpoints, baselines and the report."""

from .run_dir import RunDirectory

__all__ = ["RunDirectory"]
