"""Site-level intensity normalization: statistics fitted on a site's training images, applied to all of them.

Per-image modes (preprocess.py) remove each image's own scale and offset; the modes here keep the contrast
between a site's images and remove only the site's scanner/protocol shift:

- ``site_zscore`` / ``site_percentile``: one mean/std or one percentile range per site, from its training
  foreground voxels.
- ``ct_window``: a fixed Hounsfield window; nothing to fit.
- ``nyul``: Nyúl & Udupa histogram standardization done federatedly. Each site sends only its mean
  standardized landmarks (a handful of numbers in [0, 1]) and an image count; the server averages them
  (``average_landmarks``) and every site maps each image's own landmarks onto that average.

Everything here is plain torch/numpy: no Flower import, no state on disk (callers keep the statistics).

The public names are gathered here; fitting, applying and the foreground measurements live in
fit.py, apply.py and foreground.py; scan geometry's per-channel statistics, streamed over whole volumes one at
a time, in scan_stats.py and stream.py.
"""

from .apply import normalize_image, normalize_site
from .fit import SITE_LEVEL_MODES, SiteIntensityStats, average_landmarks, fit_site_stats
from .foreground import FOREGROUND_RULES, MAX_PERCENTILE_VOXELS, foreground_mask, intensity_histogram
from .scan_stats import STREAMED_MODES, ScanIntensityStats, fit_scan_stats, normalize_scan_sites

__all__ = [
    "FOREGROUND_RULES",
    "MAX_PERCENTILE_VOXELS",
    "SITE_LEVEL_MODES",
    "STREAMED_MODES",
    "ScanIntensityStats",
    "SiteIntensityStats",
    "average_landmarks",
    "fit_scan_stats",
    "fit_site_stats",
    "foreground_mask",
    "intensity_histogram",
    "normalize_image",
    "normalize_scan_sites",
    "normalize_site",
]
