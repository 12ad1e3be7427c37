"""A tiny training run shared by the training tests: 12 + 4 slices of 16 px, 2 + 2 epochs."""

import numpy as np

from tracin_jax.data.slices import PreprocessRecord
from tracin_jax.data.slices import SliceSet
from tracin_jax.training import optim
from tracin_jax.training import train as train_lib

CONFIG = train_lib.TrainConfig(
    model=train_lib.ModelConfig("unet", base_width=4, depth=2),
    optimizer=optim.OptimizerConfig(adam_epochs=2, adam_learning_rate=3e-3,
                                    sgd_learning_rate=0.05),
    sgd_epochs=2, batch_size=4, augment=True, seed=0, eval_batch_size=8)


def slices(n, seed, prefix):
  """`n` slices [16, 16] with a nested square tumour (ED > ET > NCR) at a random place."""
  rng = np.random.default_rng(seed)
  labels = np.zeros((n, 16, 16), np.int32)
  images = -np.ones((n, 16, 16, 4), np.float32)
  for i in range(n):
    r, c = rng.integers(3, 9, size=2)
    labels[i, r:r + 6, c:c + 6] = 2
    labels[i, r + 1:r + 5, c + 1:c + 5] = 3
    labels[i, r + 2:r + 4, c + 2:c + 4] = 1
    images[i] = rng.normal(0, 0.05, size=(16, 16, 4))
    for k in range(4):
      images[i, ..., k] += 0.3 * k * (labels[i] == (k % 3) + 1)
  cases = np.array([f"{prefix}{i // 2}" for i in range(n)])
  # Where each slice lies on its (never written) scan, 20 x 18 x 2 voxels of 1 x 1 x 2 mm:
  # what the export stage puts maps back with.
  record = PreprocessRecord.concatenate([PreprocessRecord.of_case(
      2, volume_shape=(20, 18, 2), crop_box=(2, 1, 18, 17), affine=np.diag([1.0, 1.0, 2.0, 1.0]),
      layout="brats2019", source=f"/nonexistent/{c}/{c}_t1.nii.gz") for c in cases[::2]])
  return SliceSet(images, labels, cases, np.arange(n, dtype=np.int32) % 2, record)


TRAIN, VAL = slices(12, 0, "t"), slices(4, 1, "v")
