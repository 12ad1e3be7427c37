"""A seeded synthetic brain-tumour cohort in the BraTS 2019 layout: the embedded default data.

Every file written here is synthetic and says so: case names are `BraTS19_SYN_0001`, ...,
and `cohort.json` at the root records `"synthetic": true`, the generator version, the seed
and the number of cases.

Layout (the loader for real BraTS 2019 reads it unchanged):

  <out>/cohort.json
  <out>/HGG/BraTS19_SYN_0001/BraTS19_SYN_0001_{t1,t1ce,t2,flair,seg}.nii.gz
  <out>/LGG/...                  (only when `lgg_fraction` > 0)

Volumes are 240 x 240 x 155 at 1 mm with the affine `constants.BRATS_AFFINE` (LPS-style
storage, as BraTS ships them); images are int16, non-negative, 0 outside the skull-stripped
brain; labels are uint8 in {0, 1, 2, 4}.

A case is an MNI ICBM152 2009 template brain, warped per case, with a glioma grown in it
(necrotic core, enhancing rim, edema), imaged by closed-form MR signal equations with the
scanner's blur, bias field and noise. Everything random is drawn from
`numpy.random.SeedSequence([seed, case_index])`: the same seed gives byte-identical files,
whatever the number of worker processes, and a cohort of n cases is the first n cases of any
larger cohort with the same seed.

Modules:
  anatomy     template tissue maps, each case's random choices (`draw_case_params`), its
              warp, and the tumour's shape and placement (`case_anatomy`).
  physics     MR signal physics: relaxation times, sequences, tissue signals, the
              point-spread function, bias field and noise (`mr_images`).
  cohort      `synthesize_case`, NIfTI files (`write_case`, `case_files`), the cohort on disk
              and its record (`generate_cohort`, `ensure_cohort`).
  __main__    the command line, which logs progress and prints the time taken:

  python -m tracin_jax.data.synthetic --out DIR --cases 40 --seed 0 [--workers 2]
"""

from tracin_jax.data.synthetic.anatomy import CaseParams
from tracin_jax.data.synthetic.anatomy import TissueMaps
from tracin_jax.data.synthetic.anatomy import draw_case_params
from tracin_jax.data.synthetic.anatomy import load_tissue_maps
from tracin_jax.data.synthetic.cohort import CASE_PREFIX
from tracin_jax.data.synthetic.cohort import COHORT_FILE
from tracin_jax.data.synthetic.cohort import Case
from tracin_jax.data.synthetic.cohort import FILE_KINDS
from tracin_jax.data.synthetic.cohort import GENERATOR
from tracin_jax.data.synthetic.cohort import GENERATOR_VERSION
from tracin_jax.data.synthetic.cohort import PARTIAL_FILE
from tracin_jax.data.synthetic.cohort import case_files
from tracin_jax.data.synthetic.cohort import case_name
from tracin_jax.data.synthetic.cohort import case_rng
from tracin_jax.data.synthetic.cohort import ensure_cohort
from tracin_jax.data.synthetic.cohort import generate_cohort
from tracin_jax.data.synthetic.cohort import synthesize_case
from tracin_jax.data.synthetic.cohort import write_case
from tracin_jax.data.synthetic.physics import NORMAL_TISSUES
from tracin_jax.data.synthetic.physics import PSF_SIGMA_MM
from tracin_jax.data.synthetic.physics import RELAXATION
from tracin_jax.data.synthetic.physics import SEQUENCES
from tracin_jax.data.synthetic.physics import T1_ENHANCING_GADOLINIUM
from tracin_jax.data.synthetic.physics import TISSUES
from tracin_jax.data.synthetic.physics import TUMOUR_TISSUES
from tracin_jax.data.synthetic.physics import inversion_recovery
from tracin_jax.data.synthetic.physics import spin_echo
from tracin_jax.data.synthetic.physics import tissue_signals
