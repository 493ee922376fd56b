"""predictions/report.html: one self-contained page per prediction run, from real NIfTI files, checked as
written and in headless Chromium."""

from __future__ import annotations

import base64
import io
import re
import stat
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path

import nibabel
import numpy as np
import pytest
from PIL import Image

from fedmed.runs import slices
from fedmed.workflows.prediction_report import (
    OOD_MESSAGE,
    REPORT_FILE,
    ReportCase,
    ReportModel,
    write_prediction_report,
)

SHAPE = (40, 48, 30)  # x, y, z voxels of the 3D phantom
SPACING = (1.0, 1.0, 2.0)
FAILED_ERROR = "case-003/flair.nii.gz: not a NIfTI file (looks like png); convert it or remove it from the input"
# Stored in LPS (x and y flipped): the report must show it in RAS like every other scan.
LPS = np.diag([-SPACING[0], -SPACING[1], SPACING[2], 1.0])


def _save(path: Path, array: np.ndarray, *, affine: np.ndarray) -> Path:
    nibabel.save(nibabel.Nifti1Image(array, affine), str(path))
    return path


def _phantom() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A bright ball (class 1) with a core (class 2) in noise; uncertainty high on the ball's rim."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), axis=-1).astype(float)
    centre = np.array([24.0, 20.0, 18.0])
    distance = np.sqrt((((grid - centre) * SPACING) ** 2).sum(-1))
    rng = np.random.default_rng(0)
    image = (100 + 10 * rng.standard_normal(SHAPE) + 200 * (distance < 10)).astype(np.float32)
    labels = ((distance < 10).astype(np.uint8) + (distance < 4)).astype(np.uint8)
    uncertainty = np.exp(-(((distance - 10) / 1.5) ** 2)).astype(np.float32)
    return image, labels, uncertainty


def _segmentation_case(folder: Path, name: str, *, flagged: bool) -> ReportCase:
    folder.mkdir(parents=True)
    image, labels, uncertainty = _phantom()
    return ReportCase(
        case=name,
        inputs=[_save(folder / "flair.nii.gz", image, affine=LPS), _save(folder / "t1.nii.gz", image, affine=LPS)],
        status="ok",
        output=_save(folder / f"{name}_seg.nii.gz", labels, affine=LPS),
        uncertainty_map=_save(folder / f"{name}_uncertainty.nii.gz", uncertainty, affine=LPS),
        uncertainty=0.12 if not flagged else 0.41,
        ood_score=1.5 if not flagged else 9.0,
        ood_flagged=flagged,
    )


def _classification_case(folder: Path) -> ReportCase:
    folder.mkdir(parents=True)
    image = np.zeros((64, 64, 1), dtype=np.float32)
    image[8:24, 40:56] = 1.0  # stored (H, W, 1), as 2D NIfTI often are
    saliency = np.zeros((32, 32), dtype=np.float32)  # on the model's 32 x 32 input grid
    saliency[4:12, 20:28] = 1.0
    np.save(folder / "xray_saliency.npy", saliency)
    return ReportCase(
        case="xray-7",
        inputs=[_save(folder / "xray.nii.gz", image, affine=np.eye(4))],
        status="ok",
        uncertainty=0.05,
        ood_score=0.3,
        ood_flagged=False,
        probabilities=[0.18, 0.82],
        saliency=folder / "xray_saliency.npy",
    )


SEGMENTATION = ReportModel(
    description="hippocampus, 3 sites, FedAvg, round 20",
    kind="segmentation",
    class_names=["background", "anterior", "posterior"],
    channel_names=["FLAIR", "T1"],
    uncertainty_method="tta",
    ood_threshold=4.0,
    temperature=None,
)
CLASSIFICATION = ReportModel(
    description="pneumonia, 3 sites",
    kind="classification",
    class_names=["normal", "pneumonia"],
    channel_names=["x-ray"],
    uncertainty_method="tta",
    ood_threshold=2.0,
    temperature=1.7,
    calibration={
        "site-a": {"ece_before": 0.081, "ece_after": 0.021, "cases": 120, "bins_before": {"count": [3, 4]}},
        "site-b": {},
    },
)


@pytest.fixture(scope="module")
def segmentation_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("segmentation")
    failed = ReportCase(
        case="case-003", inputs=[root / "case-003" / "flair.nii.gz"], status="failed", error=FAILED_ERROR
    )
    cases = [
        _segmentation_case(root / "case-001", "case-001", flagged=False),
        _segmentation_case(root / "case-002", "case-002", flagged=True),
        failed,
    ]
    return write_prediction_report(root, cases=cases, model=SEGMENTATION)


@pytest.fixture(scope="module")
def classification_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("classification")
    failed = ReportCase(case="xray-8", inputs=[root / "xray-8.png"], status="failed", error="xray-8.png: file is empty")
    return write_prediction_report(root, cases=[_classification_case(root / "xray-7"), failed], model=CLASSIFICATION)


class _Page(HTMLParser):
    """Collects <img> sources and checks that every opened element is closed in order."""

    VOID = frozenset({"meta", "img", "br", "link", "input", "hr"})

    def __init__(self) -> None:
        super().__init__()
        self.images: dict[str, str] = {}  # alt -> src
        self.stack: list[str] = []
        self.sections: list[dict[str, str]] = []
        self.external: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {key: value or "" for key, value in attrs}
        if tag == "img":
            self.images[values["alt"]] = values["src"]
        if tag == "section":
            self.sections.append(values)
        loads = tag in ("link", "iframe") or (tag == "script" and "src" in values) or "href" in values
        if loads and not values.get("href", "").startswith("#"):  # only links within the page
            self.external.append(f"{tag} {values}")
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1] if self.stack else None}>"
        self.stack.pop()


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    assert page.stack == [], f"unclosed elements: {page.stack}"
    return page


def _pixels(source: str) -> np.ndarray:
    assert source.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1]))).convert("RGB"))


def _section_html(path: Path, case: str) -> str:
    text = path.read_text(encoding="utf-8")
    start = text.index(f'data-case="{case}"')
    return text[start : text.index("</section>", start)]


def test_page_is_one_private_self_contained_file(segmentation_report: Path) -> None:
    assert segmentation_report.name == REPORT_FILE
    assert stat.S_IMODE(segmentation_report.stat().st_mode) == 0o600  # it shows patient images
    page = _parse(segmentation_report)
    assert page.external == []
    assert len(page.images) == 1 + 2 * 2 * 3  # colour bar + 2 cases x (contour, uncertainty) x 3 planes
    for alt, source in page.images.items():
        pixels = _pixels(source)
        assert max(pixels.shape[:2]) <= slices.MAX_SIDE, alt


def test_cases_in_the_order_given_with_status_and_flag(segmentation_report: Path) -> None:
    sections = _parse(segmentation_report).sections
    assert [s["data-case"] for s in sections] == ["case-001", "case-002", "case-003"]
    assert [s["data-status"] for s in sections] == ["ok", "ok", "failed"]
    assert [s["data-ood"] for s in sections] == ["clear", "flagged", "not-assessed"]
    assert OOD_MESSAGE[1:] in _section_html(segmentation_report, "case-002")
    assert OOD_MESSAGE[1:] not in _section_html(segmentation_report, "case-001")
    failed = _section_html(segmentation_report, "case-003")
    assert "not a NIfTI file (looks like png); convert it" in failed and "<img" not in failed
    assert "flair.nii.gz</code> (FLAIR), <code" in _section_html(segmentation_report, "case-001")


def test_contours_and_uncertainty_are_drawn_through_the_structure(segmentation_report: Path) -> None:
    images = _parse(segmentation_report).images
    for plane in slices.PLANES:
        contour = _pixels(
            next(src for alt, src in images.items() if alt.startswith(f"case-001: image, predicted contour, {plane}"))
        )
        for label in (1, 2):  # both classes' outlines, in their legend colours
            assert (contour == slices.label_colour(label)).all(axis=-1).sum() > 10, (plane, label)
        heat = _pixels(next(src for alt, src in images.items() if alt.startswith(f"case-001: uncertainty, {plane}")))
        coloured = (heat.max(axis=-1).astype(int) - heat.min(axis=-1)) > 40
        assert 0.01 < coloured.mean() < 0.5, plane  # a rim, not nothing and not everything
    # Planes cut through the ball's centre, found in RAS although the file is stored LPS.
    centre_ras = (SHAPE[0] - 1 - 24, SHAPE[1] - 1 - 20, 18)
    assert f"axial slice {centre_ras[2]}" in " ".join(images)
    assert f"coronal slice {centre_ras[1]}" in " ".join(images)
    assert f"sagittal slice {centre_ras[0]}" in " ".join(images)


def test_axial_slice_keeps_millimetre_proportions() -> None:
    image = slices.DisplayImage(np.zeros((40, 48, 30), dtype=np.float32), (1.0, 1.0, 2.0))
    axial, coronal, _ = slices.centre_planes(image, focus=None)
    assert slices.section(image.array, axial).shape == (192, round(192 * 40 / 48))  # rows = y (48 mm), cols = x
    assert slices.section(image.array, coronal).shape == (192, round(192 * 40 / 60))  # rows = z (60 mm)


def test_classification_shows_probabilities_calibration_and_saliency(classification_report: Path) -> None:
    text = classification_report.read_text(encoding="utf-8")
    page = _parse(classification_report)
    case = _section_html(classification_report, "xray-7")
    assert 'Predicted class: <span class="predicted">pneumonia</span>' in case
    assert "0.820" in case and "0.180" in case and "temperature 1.7" in case
    assert "<td>site-a</td>" in text and "0.0810" in text and "0.0210" in text and ">120<" in text and "n/a" in text
    assert "count" not in text  # reliability bins are not table cells
    saliency = _pixels(page.images["xray-7: saliency, image"])
    plain = _pixels(page.images["xray-7: image, image"])
    changed = np.abs(saliency.astype(int) - plain).max(axis=-1) > 40
    rows, columns = np.nonzero(changed)
    # The model-grid square (rows 4-12, columns 20-28 of 32) lands on the image's rows 8-24, columns 40-56 of 64.
    height, width = changed.shape
    assert 0.1 < rows.mean() / height < 0.4 and 0.6 < columns.mean() / width < 0.9
    assert "file is empty" in _section_html(classification_report, "xray-8")


def test_a_file_on_another_grid_is_noted_not_fatal(tmp_path: Path) -> None:
    case = _segmentation_case(tmp_path / "c", "c", flagged=False)
    case.output = _save(tmp_path / "small.nii.gz", np.zeros((4, 4, 4), np.uint8), affine=LPS)
    case.uncertainty_map = tmp_path / "missing.nii.gz"
    report = write_prediction_report(tmp_path, cases=[case], model=SEGMENTATION)
    section = _section_html(report, "c")
    assert "label map not shown: its grid (4, 4, 4) does not match the input image (40, 48, 30)" in section
    assert "uncertainty map not shown: cannot read missing.nii.gz (FileNotFoundError" in section
    assert section.count("<img") == 3  # the image itself, in three planes


def test_fifty_five_cases_stay_a_well_formed_page(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    image = _save(tmp_path / "big.nii.gz", rng.random((300, 40, 20), dtype=np.float32), affine=np.eye(4))
    cases = [
        ReportCase(case=f"s{i:02d}", inputs=[image], status="ok" if i % 11 else "failed", error="unreadable")
        for i in range(55)
    ]
    page = _parse(write_prediction_report(tmp_path, cases=cases, model=SEGMENTATION))
    assert [s["data-case"] for s in page.sections] == [f"s{i:02d}" for i in range(55)]
    assert len(page.images) == 50 * 3  # no uncertainty maps: no colour bar either
    assert all(max(_pixels(src).shape[:2]) <= slices.MAX_SIDE for src in page.images.values())


# In a real browser -------------------------------------------------------------------------------------------
BrowserDom = Callable[[Path, Path], tuple[str, list[str]]]


@pytest.mark.parametrize("which", ["segmentation_report", "classification_report"])
def test_browser_loads_every_overlay(
    which: str, browser_dom: BrowserDom, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    report: Path = request.getfixturevalue(which)
    total = len(_parse(report).images)
    dom, console = browser_dom(report, tmp_path)
    assert console == [], f"console messages: {console}"
    # every <img> decoded to a picture (naturalWidth > 0): the page's script counts them after load
    assert f'data-figures="{total}/{total}"' in dom, re.search(r"<body[^>]*>", dom)
    assert 'class="figure-missing"' not in dom
    if which == "segmentation_report":
        flagged = dom[dom.index('data-case="case-002"') :]
        assert 'data-ood="flagged"' in dom and OOD_MESSAGE[1:] in flagged[: flagged.index("</section>")]
        assert "not a NIfTI file (looks like png); convert it" in dom
    else:
        assert "file is empty" in dom and "pneumonia" in dom
