"""Helpers for data-layer tests: real NIfTI site folders written to tmp_path."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from data_helpers import save_nifti

from fedmed.config import SiteDrift, SynthConfig
from fedmed.data import Case, synthesize_federation, write_manifest

SiteWriter = Callable[..., Path]


@pytest.fixture
def write_site(tmp_path: Path) -> SiteWriter:
    """write_site(images, labels=None, *, name, labels_declared, split) -> site folder.

    `images` maps case name -> array; `labels` maps case name -> array (segmentation) or int (classification).
    The first case goes to validation, the rest to training (at least two cases are needed).
    """

    def write(
        images: dict[str, np.ndarray],
        labels: dict[str, np.ndarray | int] | None = None,
        *,
        name: str = "site",
        labels_declared: dict[int, str] | None = None,
        affine: np.ndarray | None = None,
    ) -> Path:
        site = tmp_path / name
        cases = []
        for case_name, image in images.items():
            image_path = save_nifti(site / "imagesTr" / f"{case_name}.nii.gz", image, affine)
            label: Path | int | None = None
            if labels is not None:
                value = labels[case_name]
                if isinstance(value, np.ndarray):
                    label = save_nifti(site / "labelsTr" / f"{case_name}.nii.gz", value, affine)
                else:
                    label = int(value)
            cases.append(Case(image=image_path, label=label))
        declared = labels_declared if labels_declared is not None else ({} if labels is None else {0: "bg", 1: "fg"})
        write_manifest(
            site,
            name=name,
            labels=declared,
            modality="MRI",
            training=cases[1:],
            validation=cases[:1],
            tensor_image_size=f"{images[next(iter(images))].ndim}D",
        )
        return site

    return write


@pytest.fixture(scope="session")
def synth_seg_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small clean synthetic 3D segmentation site (not to be modified by tests)."""
    config = SynthConfig(
        task="segmentation",
        spatial_dims=3,
        image_size=[16, 16, 16],
        train_cases=4,
        val_cases=2,
        seed=3,
        sites=[SiteDrift(name="clean")],
    )
    return synthesize_federation(config, tmp_path_factory.mktemp("synth"))[0].path
