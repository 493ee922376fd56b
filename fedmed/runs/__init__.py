"""The run directory and what a person reads from it: metrics, checkpoints, summary, report, plots.

Storage and presentation only: imports fedmed.config and fedmed.core, never training or Flower.
"""

from .run_dir import RunDirectory

__all__ = ["RunDirectory"]
