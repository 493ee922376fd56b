"""The task registry: `task.kind` in a run config picks a task class registered here.

A task class takes the run's [task] config (fedmed.tasks.base.Task); each task file registers its class with
`@TASKS.register("kind")`, and fedmed/tasks/__init__.py imports the file so that it registers.
"""

from __future__ import annotations

from collections.abc import Callable

from fedmed.config import TaskConfig
from fedmed.core.registry import Registry

from .base import Task

TaskBuilder = Callable[[TaskConfig], Task]

TASKS = Registry[TaskBuilder]("task", field="task.kind")


def get_task(config: TaskConfig) -> Task:
    """The run's task; an unknown task.kind raises a ConfigError naming every known one."""
    return TASKS.get(config.kind)(config)
