"""Synthetic tissue phantoms: an "organ" with texture, lesions to find, and unlabelled distractors.

Lesions vary in size and contrast (some barely above the texture) and dark cysts appear that are not
lesions, so a network cannot threshold its way to a good score and more training data keeps helping.

Two families. The voxel phantoms (voxel.py) draw one generic contrast on a voxel grid; they are frozen,
because existing synthetic federations must keep their exact voxels. The scan phantoms (scan.py) look like
real multi-modal brain scans: anatomy drawn in millimetres (anatomy.py), rendered at any site's voxel spacing
(render.py) and seen through one contrast per modality (contrasts.py).
"""

from .anatomy import Grid
from .contrasts import CONTRASTS, TISSUES, contrast
from .scan import scan_classification_phantom, scan_enhancement_phantom, scan_segmentation_phantom
from .voxel import classification_phantom, enhancement_phantom, segmentation_phantom

__all__ = [
    "CONTRASTS",
    "TISSUES",
    "Grid",
    "classification_phantom",
    "contrast",
    "enhancement_phantom",
    "scan_classification_phantom",
    "scan_enhancement_phantom",
    "scan_segmentation_phantom",
    "segmentation_phantom",
]
