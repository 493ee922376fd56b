"""synthesize_federation: determinism, reuse, prevalence steering, drift on images only, every task."""

from __future__ import annotations

import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fedmed.config.schema import SiteDrift, SynthConfig, TaskConfig
from fedmed.data import DataOutputError, load_site, read_manifest, synthesize_federation, validate_site
from fedmed.data.phantoms import classification_phantom


def config(**changes: object) -> SynthConfig:
    settings: dict[str, object] = {
        "task": "segmentation",
        "spatial_dims": 3,
        "image_size": [16, 16, 16],
        "train_cases": 3,
        "val_cases": 2,
        "seed": 0,
        "sites": [SiteDrift(name="a"), SiteDrift(name="b", noise_std=0.02, bias_field=0.2)],
    }
    settings.update(changes)
    return SynthConfig(**settings)  # type: ignore[arg-type]


def volumes(site: Path, folder: str = "imagesTr") -> dict[str, np.ndarray]:
    return {path.name: np.asarray(nib.load(str(path)).dataobj) for path in sorted((site / folder).iterdir())}


def test_same_seed_same_voxels_and_bytes_other_seed_differs(tmp_path: Path) -> None:
    first = synthesize_federation(config(), tmp_path / "one")
    second = synthesize_federation(config(), tmp_path / "two")
    other = synthesize_federation(config(seed=1), tmp_path / "three")
    for left, right, changed in zip(first, second, other):
        assert left.name == right.name
        for folder in ("imagesTr", "labelsTr"):
            a, b, c = volumes(left.path, folder), volumes(right.path, folder), volumes(changed.path, folder)
            assert a.keys() == b.keys() and all(np.array_equal(a[key], b[key]) for key in a)
            assert not all(np.array_equal(a[key], c[key]) for key in a)
        for path in (left.path / "imagesTr").iterdir():
            assert path.read_bytes() == (right.path / "imagesTr" / path.name).read_bytes()


def test_written_files_are_real_nifti_with_a_1mm_affine(tmp_path: Path) -> None:
    site = synthesize_federation(config(spatial_dims=2, image_size=[20, 24]), tmp_path)[0].path
    manifest = read_manifest(site)
    image = nib.load(str(manifest.training[0].image))
    label = nib.load(str(manifest.training[0].label))  # type: ignore[arg-type]
    assert image.shape == (20, 24) and image.get_data_dtype() == np.float32
    assert label.get_data_dtype() == np.uint8
    np.testing.assert_allclose(np.abs(np.diag(image.affine)[:3]), [1.0, 1.0, 1.0])
    assert manifest.fedmed["synth_fingerprint"] and manifest.fedmed["site_index"] == 0


def test_existing_site_is_reused_or_refused_never_silently_replaced(tmp_path: Path) -> None:
    site = synthesize_federation(config(), tmp_path)[0].path
    stamp = (site / "dataset.json").stat().st_mtime_ns
    synthesize_federation(config(), tmp_path)
    assert (site / "dataset.json").stat().st_mtime_ns == stamp  # reused, not rewritten
    changed = config(sites=[SiteDrift(name="a", gamma=1.5), SiteDrift(name="b", noise_std=0.02, bias_field=0.2)])
    with pytest.raises(DataOutputError, match="overwrite") as caught:
        synthesize_federation(changed, tmp_path)
    assert str(site) in str(caught.value)
    synthesize_federation(changed, tmp_path, overwrite=True)
    assert read_manifest(site).fedmed["drift"]["gamma"] == 1.5
    # Adding a site leaves the existing ones alone.
    grown = changed.model_copy(update={"sites": [*changed.sites, SiteDrift(name="c")]})
    stamp = (site / "dataset.json").stat().st_mtime_ns
    assert [entry.name for entry in synthesize_federation(grown, tmp_path)] == ["a", "b", "c"]
    assert (site / "dataset.json").stat().st_mtime_ns == stamp


def test_overwrite_refuses_to_delete_a_folder_that_is_not_a_site(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "notes.txt").write_text("someone's work")
    with pytest.raises(DataOutputError, match="not a site folder"):
        synthesize_federation(config(), tmp_path, overwrite=True)
    assert (tmp_path / "a" / "notes.txt").read_text() == "someone's work"
    with pytest.raises(DataOutputError, match="not made by `fedmed synth`"):
        synthesize_federation(config(), tmp_path)


def test_segmentation_prevalence_steers_the_foreground_fraction(tmp_path: Path) -> None:
    sites = [SiteDrift(name="sparse", label_prevalence=0.01), SiteDrift(name="dense", label_prevalence=0.05)]
    entries = synthesize_federation(config(image_size=[32, 32, 32], train_cases=8, val_cases=2, sites=sites), tmp_path)
    fractions = {
        entry.name: np.mean([label.mean() for label in volumes(entry.path, "labelsTr").values()]) for entry in entries
    }
    assert fractions["sparse"] == pytest.approx(0.01, rel=0.4)
    assert fractions["dense"] == pytest.approx(0.05, rel=0.4)


def test_classification_positive_rate_and_lesion(tmp_path: Path) -> None:
    sites = [SiteDrift(name="low", label_prevalence=0.25), SiteDrift(name="high", label_prevalence=0.75)]
    synth = config(task="classification", spatial_dims=2, image_size=[32, 32], train_cases=8, val_cases=4, sites=sites)
    entries = synthesize_federation(synth, tmp_path)
    manifests = {entry.name: read_manifest(entry.path) for entry in entries}
    assert manifests["low"].labels == {0: "normal", 1: "lesion"}
    positives = {
        name: [sum(int(case.label) for case in getattr(manifest, split)) for split in ("training", "validation")]
        for name, manifest in manifests.items()
    }
    assert positives == {"low": [2, 1], "high": [6, 3]}
    # Same random stream, lesion or not: the difference is one small blob brighter than the noise.
    positive = classification_phantom((64, 64), rng=np.random.default_rng(7), positive=True)
    negative = classification_phantom((64, 64), rng=np.random.default_rng(7), positive=False)
    raised = (positive - negative) > 0.06
    assert 0.001 < raised.mean() < 0.05 and float((positive - negative).max()) > 0.1


def test_drift_changes_images_but_never_labels(tmp_path: Path) -> None:
    plain = synthesize_federation(config(sites=[SiteDrift(name="s")]), tmp_path / "plain")[0].path
    drift = SiteDrift(name="s", intensity_scale=2.0, intensity_offset=1.0, noise_std=0.03)
    drifted = synthesize_federation(config(sites=[drift]), tmp_path / "drifted")[0].path
    plain_labels, drifted_labels = volumes(plain, "labelsTr"), volumes(drifted, "labelsTr")
    assert all(np.array_equal(plain_labels[key], drifted_labels[key]) for key in plain_labels)
    plain_images, drifted_images = volumes(plain), volumes(drifted)
    for key in plain_images:
        assert float(drifted_images[key].mean()) == pytest.approx(2.0 * float(plain_images[key].mean()) + 1.0, rel=0.02)
        residual = drifted_images[key] - (2.0 * plain_images[key] + 1.0)
        assert 0.5 * 0.03 < float(residual.std()) / float(np.ptp(drifted_images[key])) < 2 * 0.03


@pytest.mark.parametrize("kind", ["segmentation", "classification", "enhancement"])
@pytest.mark.parametrize("dims", [2, 3])
def test_every_task_and_dimensionality_writes_a_loadable_valid_site(tmp_path: Path, kind: str, dims: int) -> None:
    size = [16] * dims
    sites = [SiteDrift(name="x", blur_sigma=0.5)]
    synth = config(task=kind, spatial_dims=dims, image_size=size, train_cases=2, val_cases=1, sites=sites)
    site = synthesize_federation(synth, tmp_path)[0].path
    task = TaskConfig(kind=kind, spatial_dims=dims, image_size=[8] * dims)  # type: ignore[arg-type]
    report = validate_site(site, task=task)
    assert report.problems == [] and report.kind == kind
    data = load_site(site, task=task)
    assert (data.num_train, data.num_val) == (2, 1)
    sample = data.train[0]
    assert sample["image"].shape == (1, *[8] * dims)
    if kind == "segmentation":
        assert sample["label"].shape == (1, *[8] * dims)
    elif kind == "classification":
        assert sample["label"].ndim == 0
    else:
        assert "label" not in sample


def test_demo_federation_is_fast(tmp_path: Path) -> None:
    demo = config(
        image_size=[32, 32, 32],
        train_cases=12,
        val_cases=6,
        sites=[
            SiteDrift(name="a"),
            SiteDrift(name="b", intensity_scale=1.4, bias_field=0.2, noise_std=0.03),
            SiteDrift(name="c", blur_sigma=0.8, downsample=2, gamma=1.3),
        ],
    )
    started = time.perf_counter()
    entries = synthesize_federation(demo, tmp_path)
    elapsed = time.perf_counter() - started
    assert len(entries) == 3 and sum(1 for _ in (entries[2].path / "imagesTr").iterdir()) == 18
    assert elapsed < 10.0, f"demo federation took {elapsed:.1f} s"
