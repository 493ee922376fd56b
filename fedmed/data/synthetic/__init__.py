"""Simulated federations: synthetic phantom sites (synth.py, phantoms/), and one real collection split into
sites (federate.py), each site seen through a scanner drift of its own (drift.py)."""

from .drift import apply_drift
from .federate import cases_from_folder_pairs, cases_from_subfolders, split_into_sites
from .synth import synthesize_federation

__all__ = [
    "apply_drift",
    "cases_from_folder_pairs",
    "cases_from_subfolders",
    "split_into_sites",
    "synthesize_federation",
]
