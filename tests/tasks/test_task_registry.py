"""Tasks by name: each task file registers its class under its task.kind."""

from __future__ import annotations

import pytest

from fedmed.config import TaskConfig
from fedmed.core.errors import ConfigError
from fedmed.tasks import TASKS, get_task
from fedmed.tasks.classification import ClassificationTask
from fedmed.tasks.enhancement import EnhancementTask
from fedmed.tasks.segmentation import SegmentationTask


def test_every_task_kind_is_registered_under_its_name() -> None:
    assert TASKS.names() == ["classification", "enhancement", "segmentation"]
    assert isinstance(get_task(TaskConfig(kind="segmentation", image_size=[16, 16])), SegmentationTask)
    assert isinstance(get_task(TaskConfig(kind="classification", image_size=[16, 16])), ClassificationTask)
    enhancement = TaskConfig(kind="enhancement", enhancement="denoise", image_size=[16, 16], intensity="minmax")
    assert isinstance(get_task(enhancement), EnhancementTask)


def test_an_unknown_task_kind_names_the_field_and_the_known_kinds() -> None:
    with pytest.raises(ConfigError, match=r"task\.kind: unknown task 'detection'.*classification, enhancement"):
        TASKS.get("detection")
