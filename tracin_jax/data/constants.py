"""BraTS 2019 conventions, written once.

Channel order, label values and the region definitions used by every module.
"""

import numpy as np

# Input channels, in this order everywhere: T1, T1Gd, T2, FLAIR.
MODALITIES = ("t1", "t1ce", "t2", "flair")
MODALITY_NAMES = ("T1", "T1Gd", "T2", "FLAIR")

# File suffix of the label volume: <case>_seg.nii.gz
SEG_SUFFIX = "seg"

# Raw BraTS labels: 0 background, 1 NCR/NET, 2 ED, 4 ET. Label 4 becomes 3 on load.
BRATS_LABELS = (0, 1, 2, 4)
CLASS_NAMES = ("background", "NCR/NET", "ED", "ET")
TUMOUR_CLASSES = (1, 2, 3)  # the classes TracIn explains (background excluded)
TUMOUR_CLASS_NAMES = tuple(CLASS_NAMES[c] for c in TUMOUR_CLASSES)  # NCR/NET, ED, ET
NUM_CLASSES = 4

# BraTS-style evaluation regions (after 4 -> 3).
REGIONS = {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}
# What Dice is reported on: the three classes, then the whole tumour and the tumour core.
DICE_NAMES = TUMOUR_CLASS_NAMES + ("WT", "TC")

# Volume geometry: 240 x 240 x 155 at 1 mm.
VOLUME_SHAPE = (240, 240, 155)

# The affine that BraTS 2019 NIfTI files carry (x and y flipped: LPS-style storage).
BRATS_AFFINE = np.array(
    [
        [-1.0, 0.0, 0.0, 0.0],
        [0.0, -1.0, 0.0, 239.0],
        [0.0, 0.0, 1.0, 0.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)

# Cohort groups.
GROUPS = ("HGG", "LGG")


def remap_labels(seg: np.ndarray) -> np.ndarray:
  """Maps raw BraTS labels {0, 1, 2, 4} to class indices {0, 1, 2, 3}."""
  out = np.asarray(seg).astype(np.int32, copy=True)
  out[out == 4] = 3
  return out
