"""synthesize_federation: determinism, reuse, prevalence steering, drift on images only, every task; several
modalities, nested label classes and per-site voxel spacing, with existing configs' files unchanged."""

from __future__ import annotations

import hashlib
import json
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy.ndimage import binary_dilation

from fedmed.config import SiteDrift, SynthConfig, TaskConfig
from fedmed.data import DataOutputError, load_site, read_manifest, synthesize_federation, validate_site
from fedmed.data.synthetic.phantoms import CONTRASTS, Grid, classification_phantom, contrast, scan_segmentation_phantom
from fedmed.data.synthetic.synth import site_fingerprint


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


def test_demo_federation_writes_every_site(tmp_path: Path) -> None:
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
    # How long this takes is a benchmark's business (the demo's time is in the README), not a unit test's.
    entries = synthesize_federation(demo, tmp_path)
    assert len(entries) == 3 and sum(1 for _ in (entries[2].path / "imagesTr").iterdir()) == 18
    assert all(validate_site(entry.path).ok for entry in entries)


def test_synth_into_a_relative_folder_writes_a_site_that_checks_clean(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from fedmed.cli.main import app

    (tmp_path / "synth.toml").write_text(
        '[synth]\ntask = "segmentation"\nspatial_dims = 2\nimage_size = [16, 16]\ntrain_cases = 2\n'
        'val_cases = 1\n[[synth.sites]]\nname = "hospital-a"\n'
    )
    monkeypatch.chdir(tmp_path)
    written = CliRunner().invoke(app, ["synth", "synth.toml", "data"])
    assert written.exit_code == 0, written.output
    site = Path("data") / "hospital-a"
    raw = json.loads((site / "dataset.json").read_text())
    listed = [entry[key] for split in ("training", "validation") for entry in raw[split] for key in ("image", "label")]
    assert all(path.startswith(("./imagesTr/", "./labelsTr/")) for path in listed), listed
    # What `fedmed site check data/hospital-a` runs: every listed file is found and reads.
    report = validate_site(site)
    assert report.ok and not report.problems, report.summary()
    checked = CliRunner().invoke(app, ["site", "check", str(site)])
    assert checked.exit_code == 0, checked.output


# Multi-modal, nested labels, native spacing ------------------------------------------------------------------


def voxel_digest(site: Path) -> str:
    """Every NIfTI's voxels and affine: what a config's files hold, whatever gzip makes of them."""
    digest = hashlib.sha256()
    for path in sorted(site.rglob("*.nii.gz")):
        image = nib.load(str(path))
        digest.update(str(path.relative_to(site)).encode())
        digest.update(np.asarray(image.dataobj).tobytes())
        digest.update(np.asarray(image.affine, dtype=np.float64).tobytes())
    return digest.hexdigest()[:16]


# Voxel digests computed with the generator as it was before modalities, nested classes and spacing existed;
# the fingerprints are the ones its dataset.json files held (checked byte for byte when this was written).
GOLDEN = {
    ("segmentation", 3): (["d0e7bff2e34eb768", "d69fde4dffb37ad3"], ["c017c1d7cacb1c9b", "e7851e922fa1d1a4"]),
    ("segmentation", 2): (["800494ecdbc50014", "5d10badf333676eb"], ["37bb26b4439d7d71", "ec9d273ffc61e81e"]),
    ("classification", 2): (["ddc84f88ba4ab5ad", "06385711a97cc2d8"], ["74562269d314fdee", "0cb44931c5ec4c23"]),
    ("enhancement", 3): (["5e84522f8d12d2c0", "1991b0629c1de831"], ["c9378986641ee487", "053e95ebd2724f7e"]),
}


@pytest.mark.parametrize(("kind", "dims"), list(GOLDEN))
def test_existing_configs_keep_their_exact_voxels_and_fingerprints(tmp_path: Path, kind: str, dims: int) -> None:
    sites = [SiteDrift(name="a"), SiteDrift(name="b", noise_std=0.02, bias_field=0.2, downsample=2, gamma=1.3)]
    synth = config(
        task=kind, spatial_dims=dims, image_size=[16] * dims, train_cases=2, val_cases=1, seed=3, sites=sites
    )
    entries = synthesize_federation(synth, tmp_path)
    digests, fingerprints = GOLDEN[(kind, dims)]
    assert [voxel_digest(entry.path) for entry in entries] == digests
    # Same fingerprint: federations already on disk are reused, not regenerated.
    assert [site_fingerprint(synth, site_index=index) for index in range(2)] == fingerprints
    manifest = read_manifest(entries[0].path)
    assert manifest.modality == {0: "MRI"} and "modalities" not in manifest.fedmed
    assert all(not case.other_modalities for case in manifest.training)


def brain(**changes: object) -> SynthConfig:
    settings: dict[str, object] = {
        "image_size": [24, 24, 24],
        "train_cases": 2,
        "val_cases": 1,
        "modalities": ["FLAIR", "T1", "T1Gd", "T2"],
        "num_classes": 4,
        "sites": [SiteDrift(name="a")],
    }
    settings.update(changes)
    return config(**settings)


def test_several_modalities_write_one_coregistered_file_each_with_its_own_contrast(tmp_path: Path) -> None:
    site = synthesize_federation(brain(train_cases=4), tmp_path)[0].path
    manifest = read_manifest(site)
    assert manifest.modality == {0: "FLAIR", 1: "T1", 2: "T1Gd", 3: "T2"}
    assert manifest.labels == {0: "background", 1: "oedema", 2: "necrotic core", 3: "enhancing core"}
    raw = json.loads((site / "dataset.json").read_text())
    assert raw["training"][0]["image"] == [f"./imagesTr/a_000_{index:04d}.nii.gz" for index in range(4)]
    assert len(list((site / "imagesTr").iterdir())) == 4 * 5
    ratios: dict[str, list[float]] = {name: [] for name in manifest.modality.values()}
    enhancing: dict[str, list[float]] = {"T1": [], "T1Gd": []}
    for case in manifest.training + manifest.validation:
        files = [nib.load(str(path)) for path in case.images]
        label = np.asarray(nib.load(str(case.label)).dataobj)  # type: ignore[arg-type]
        assert all(image.shape == label.shape and np.allclose(image.affine, files[0].affine) for image in files)
        arrays = dict(zip(manifest.modality.values(), (np.asarray(image.dataobj) for image in files)))
        # Healthy tissue: inside the head (every contrast well above air) and outside any lesion.
        healthy = (np.mean(list(arrays.values()), axis=0) > 0.2) & (label == 0)
        for name, array in arrays.items():
            ratios[name].append(float(array[label > 0].mean() / array[healthy].mean()))
        if (label == 3).any():
            for name in enhancing:
                enhancing[name].append(float(arrays[name][label == 3].mean()))
    mean = {name: float(np.mean(values)) for name, values in ratios.items()}
    assert mean["FLAIR"] > 1.25 and mean["T2"] > 1.2  # oedema bright
    assert mean["T1"] < 1.05 and mean["FLAIR"] - mean["T1"] > 0.3  # iso- to hypo-intense on T1
    assert np.mean(enhancing["T1Gd"]) > 1.4 * np.mean(enhancing["T1"])  # gadolinium lights up the enhancing part


def test_every_modality_gets_the_sites_drift(tmp_path: Path) -> None:
    plain = synthesize_federation(brain(modalities=["FLAIR", "T1"]), tmp_path / "plain")[0].path
    drifted_config = brain(
        modalities=["FLAIR", "T1"], sites=[SiteDrift(name="a", intensity_scale=2.0, intensity_offset=1.0)]
    )
    drifted = synthesize_federation(drifted_config, tmp_path / "drifted")[0].path
    before, after = volumes(plain), volumes(drifted)
    assert {name[-11:] for name in before} == {"0000.nii.gz", "0001.nii.gz"}
    for name in before:
        np.testing.assert_allclose(after[name], 2.0 * before[name] + 1.0, rtol=1e-5, atol=1e-5)
    assert volumes(plain, "labelsTr").keys() == volumes(drifted, "labelsTr").keys()


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("num_classes", [3, 4])
def test_nested_labels_keep_every_sub_region_inside_its_parent(tmp_path: Path, dims: int, num_classes: int) -> None:
    coarse = [0.8, 2.5] if dims == 2 else [0.8, 0.8, 2.5]
    sites = [SiteDrift(name="a"), SiteDrift(name="b", spacing=coarse)]
    size = [48, 48] if dims == 2 else [24, 24, 24]
    synth = brain(spatial_dims=dims, image_size=size, num_classes=num_classes, modalities=["FLAIR", "T1"], sites=sites)
    seen: set[int] = set()
    for entry in synthesize_federation(synth, tmp_path / "nested"):
        for label in volumes(entry.path, "labelsTr").values():
            assert label.dtype == np.uint8 and int(label.max()) < num_classes
            seen |= set(np.unique(label).tolist())
            for value in range(2, num_classes):
                # A sub-region has its parent on every side, at every site's spacing.
                grown = binary_dilation(label >= value)
                assert not (grown & (label < value - 1)).any(), f"label {value} touches label < {value - 1}"
    assert seen == set(range(num_classes))
    # The anatomy does not depend on num_classes: 2 classes give the same images and the whole lesions.
    binary = synthesize_federation(synth.model_copy(update={"num_classes": 2}), tmp_path / "binary")
    nested = synthesize_federation(synth, tmp_path / "nested")
    for left, right in zip(binary, nested):
        assert all(np.array_equal(a, b) for a, b in zip(volumes(left.path).values(), volumes(right.path).values()))
        for a, b in zip(volumes(left.path, "labelsTr").values(), volumes(right.path, "labelsTr").values()):
            assert np.array_equal(a, (b > 0).astype(np.uint8))
    assert read_manifest(nested[0].path).fedmed["regions"]["whole"] == list(range(1, num_classes))


def test_each_site_writes_its_native_spacing_over_the_same_field_of_view(tmp_path: Path) -> None:
    sites = [
        SiteDrift(name="ref"),
        SiteDrift(name="thick", spacing=[0.8, 0.8, 3.0]),
        SiteDrift(name="iso", spacing=[1.5] * 3),
    ]
    synth = brain(image_size=[30, 30, 24], spacing=[1.0, 1.0, 1.25], modalities=["FLAIR", "T1"], sites=sites)
    expected = {
        "ref": ((30, 30, 24), [1.0, 1.0, 1.25]),
        "thick": ((38, 38, 10), [0.8, 0.8, 3.0]),
        "iso": ((20, 20, 20), [1.5] * 3),
    }
    for entry in synthesize_federation(synth, tmp_path):
        shape, spacing = expected[entry.name]
        for folder in ("imagesTr", "labelsTr"):
            for path in (entry.path / folder).iterdir():
                image = nib.load(str(path))
                assert image.shape == shape
                np.testing.assert_allclose(image.header.get_zooms(), spacing)
                np.testing.assert_allclose(np.diag(image.affine)[:3], spacing)
                # Centred on the world origin: the same 30 x 30 x 30 mm field of view at every site.
                np.testing.assert_allclose(image.affine[:3, 3], -(np.array(shape) - 1) / 2 * spacing)
        assert read_manifest(entry.path).fedmed["spacing"] == spacing
        report = validate_site(
            entry.path, task=TaskConfig(kind="segmentation", spatial_dims=3, image_size=[16] * 3, num_classes=4)
        )
        assert report.problems == []


def test_the_same_case_shows_the_same_anatomy_at_every_spacing() -> None:
    fov = [32.0, 32.0, 30.0]
    found = {}
    for spacing in ([1.0, 1.0, 1.0], [0.8, 0.8, 3.0], [2.0, 2.0, 1.5]):
        shape = tuple(round(extent / step) for extent, step in zip(fov, spacing))
        grid = Grid(shape, tuple(spacing))
        images, label = scan_segmentation_phantom(
            grid,
            fov_mm=fov,
            voxel_mm=1.0,
            modalities=["FLAIR"],
            num_classes=2,
            prevalence=0.04,
            rng=np.random.default_rng(11),
        )
        centres = np.meshgrid(*grid.axes(), indexing="ij")
        lesion = label > 0
        found[tuple(spacing)] = (
            float(lesion.sum() * np.prod(spacing)),  # mm^3
            np.array([float(axis[lesion].mean()) for axis in centres]),  # mm
            float(images[0][images[0] > 0.2].mean()),
        )
    reference_volume, reference_centre, reference_signal = found[(1.0, 1.0, 1.0)]
    for volume, centre, signal in found.values():
        assert volume == pytest.approx(reference_volume, rel=0.15)
        assert np.abs(centre - reference_centre).max() < 1.5
        assert signal == pytest.approx(reference_signal, rel=0.05)


@pytest.mark.parametrize("kind", ["segmentation", "classification", "enhancement"])
@pytest.mark.parametrize("dims", [2, 3])
def test_multi_modal_sites_of_every_task_validate_and_load(tmp_path: Path, kind: str, dims: int) -> None:
    sites = [SiteDrift(name="x", spacing=[1.25] * dims, noise_std=0.01)]
    synth = config(
        task=kind,
        spatial_dims=dims,
        image_size=[20] * dims,
        train_cases=2,
        val_cases=1,
        modalities=["FLAIR", "T2"],
        sites=sites,
    )
    site = synthesize_federation(synth, tmp_path)[0].path
    task = TaskConfig(kind=kind, spatial_dims=dims, image_size=[8] * dims)  # type: ignore[arg-type]
    assert validate_site(site, task=task).problems == []
    data = load_site(site, task=task)
    assert data.train[0]["image"].shape == (2, *[8] * dims)
    assert nib.load(str(read_manifest(site).training[0].image)).shape == (16,) * dims


def test_scan_phantoms_steer_the_foreground_fraction(tmp_path: Path) -> None:
    sites = [SiteDrift(name="sparse", label_prevalence=0.01), SiteDrift(name="dense", label_prevalence=0.05)]
    synth = brain(image_size=[32, 32, 32], train_cases=8, val_cases=2, modalities=["T1"], num_classes=2, sites=sites)
    fractions = {
        entry.name: np.mean([label.mean() for label in volumes(entry.path, "labelsTr").values()])
        for entry in synthesize_federation(synth, tmp_path)
    }
    assert fractions["sparse"] == pytest.approx(0.01, rel=0.4)
    assert fractions["dense"] == pytest.approx(0.05, rel=0.4)


def test_contrast_table_aliases_and_a_fixed_fallback_for_unknown_names() -> None:
    assert contrast("t1ce") == contrast("T1-Gd") == CONTRASTS["T1Gd"]
    assert contrast("T2w") == CONTRASTS["T2"] and contrast("flair") == CONTRASTS["FLAIR"]
    unknown = contrast("DWI")
    assert unknown == contrast("dwi") and unknown != contrast("SWI")
    assert all(abs(unknown[tissue] - unknown["white_matter"]) >= 0.1 for tissue in ("fluid", "oedema", "enhancing"))


def test_a_site_is_written_one_case_at_a_time(tmp_path: Path) -> None:
    """Peak memory does not grow with the number of cases: nothing holds a whole site's volumes."""

    def peak(cases: int, folder: str) -> int:
        synth = brain(image_size=[32, 32, 32], train_cases=cases, val_cases=1, modalities=["FLAIR", "T1"])
        tracemalloc.start()
        try:
            synthesize_federation(synth, tmp_path / folder)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    few, many = peak(1, "few"), peak(8, "many")
    one_case = 2 * 4 * 32**3  # two float32 modalities
    assert many < few + 2 * one_case, (few, many)
