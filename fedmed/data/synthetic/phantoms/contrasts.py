"""What each tissue looks like in each modality: the scan phantoms' tissues and contrast tables."""

from __future__ import annotations

import hashlib
import re

import numpy as np

from .anatomy import Lesion

TISSUES = ("background", "grey_matter", "white_matter", "fluid", "oedema", "core", "enhancing")
LESION_TISSUES = TISSUES[4:]  # a lesion's compartments, outermost first; label value = depth in this order
LESION_ID = len(TISSUES) - len(LESION_TISSUES)  # tissue ids from here on: lesion i, compartment d

# Relative signal of each tissue (0: none, 1: the brightest), after the textbook look of a glioma on brain MRI.
# FLAIR: free fluid suppressed (dark), oedema brightest, grey matter above white. T1: white matter above grey,
# fluid dark, the tumour hypo- to iso-intense. T1Gd: T1 after gadolinium, the enhancing tumour brightest.
# T2: fluid brightest, oedema and necrotic core bright. MRI: the voxel phantoms' generic contrast (grey tissue,
# brighter lesions, darker cysts). Columns follow TISSUES.
CONTRASTS: dict[str, dict[str, float]] = {
    name: dict(zip(TISSUES, values, strict=True))
    for name, values in {
        "MRI": (0.05, 0.50, 0.46, 0.30, 0.62, 0.66, 0.70),
        "FLAIR": (0.02, 0.45, 0.36, 0.08, 0.85, 0.60, 0.72),
        "T1": (0.02, 0.42, 0.62, 0.12, 0.34, 0.22, 0.40),
        "T1Gd": (0.02, 0.42, 0.62, 0.12, 0.34, 0.22, 0.95),
        "T2": (0.02, 0.55, 0.40, 0.95, 0.82, 0.88, 0.65),
    }.items()
}
# Other spellings of the same contrasts, compared lower-case without punctuation ("T1-Gd" -> "t1gd").
CONTRAST_ALIASES = {
    "mr": "MRI",
    "mri": "MRI",
    "flair": "FLAIR",
    "t2flair": "FLAIR",
    "t1": "T1",
    "t1w": "T1",
    "t1gd": "T1Gd",
    "t1ce": "T1Gd",
    "t1c": "T1Gd",
    "t1wce": "T1Gd",
    "t1post": "T1Gd",
    "t2": "T2",
    "t2w": "T2",
}
# Unknown modalities: how far each tissue stands off white matter (either side), so that it stays visible.
FALLBACK_STEPS = {"fluid": (0.2, 0.4), "oedema": (0.15, 0.35), "core": (0.1, 0.3), "enhancing": (0.15, 0.4)}


def contrast(name: str) -> dict[str, float]:
    """Each tissue's signal in modality `name`: `CONTRASTS` (aliases allowed), else a fixed table from the name.

    An unknown name gets its own table seeded by the name itself (not Python's salted hash), so it looks the
    same in every run, and every tissue other than grey matter stands a visible step off white matter.
    """
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    known = CONTRAST_ALIASES.get(key)
    if known is not None:
        return dict(CONTRASTS[known])
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little"))
    white = float(rng.uniform(0.3, 0.6))
    values = {"background": 0.02, "white_matter": white, "grey_matter": white + float(rng.uniform(-0.12, 0.12))}
    for tissue, (low, high) in FALLBACK_STEPS.items():
        values[tissue] = white + float(rng.choice([-1.0, 1.0]) * rng.uniform(low, high))
    return {tissue: float(np.clip(values[tissue], 0.02, 1.0)) for tissue in TISSUES}


def signal_table(name: str, *, lesions: list[Lesion], rng: np.random.Generator) -> np.ndarray:
    """Signal per tissue id for one modality: the contrast table, varied a little per case and per lesion."""
    table = contrast(name)
    healthy = np.array([table[tissue] for tissue in TISSUES[:LESION_ID]])
    healthy[1:] *= 1.0 + rng.normal(0.0, 0.03, LESION_ID - 1)  # scanners and patients differ a little
    # A faint lesion fades towards the brain's average signal, neither grey nor white matter's.
    parenchyma = healthy[[TISSUES.index("grey_matter"), TISSUES.index("white_matter")]].mean()
    reference = (table["grey_matter"] + table["white_matter"]) / 2
    lesion_values = [
        parenchyma + lesion.conspicuity * (table[tissue] - reference) for lesion in lesions for tissue in LESION_TISSUES
    ]
    return np.concatenate([healthy, np.asarray(lesion_values, dtype=np.float64)])
