"""Site data: MSD-style manifests, loading and preprocessing, validation, drift and synthetic federations.

Imports only fedmed.config and fedmed.core. MONAI is imported only when images are read or resampled,
so importing this package stays cheap.
"""

from .loading import Sample, SiteData, clear_site_cache, load_site
from .manifest import Case, Manifest, read_manifest, write_manifest
from .npz import NpzSite, read_npz_site
from .problems import DataOutputError, DataProblem, DataValidationError
from .synthetic import (
    apply_drift,
    cases_from_folder_pairs,
    cases_from_subfolders,
    split_into_sites,
    synthesize_federation,
)
from .validation import ValidationReport, check_site, validate_site

__all__ = [
    "Case",
    "DataOutputError",
    "DataProblem",
    "DataValidationError",
    "Manifest",
    "NpzSite",
    "Sample",
    "SiteData",
    "ValidationReport",
    "apply_drift",
    "cases_from_folder_pairs",
    "cases_from_subfolders",
    "check_site",
    "clear_site_cache",
    "load_site",
    "read_manifest",
    "read_npz_site",
    "split_into_sites",
    "synthesize_federation",
    "validate_site",
    "write_manifest",
]
