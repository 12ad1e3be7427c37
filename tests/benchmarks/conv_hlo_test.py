"""benchmarks/conv_hlo.py reads where each convolution of optimised HLO runs."""

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import conv_hlo

# Two computations as XLA:CPU prints them: a YNNPACK fusion whose body is a weight gradient
# (whole-map window, grouped), and a narrow convolution left in the entry computation.
HLO = """\
HloModule jit_f

%fused_computation (param_0: f32[8,96,96,8], param_1: f32[96,96,1,96]) -> f32[8,3,3,96] {
  %param_0 = f32[8,96,96,8]{3,2,1,0} parameter(0)
  %param_1 = f32[96,96,1,96]{3,2,1,0} parameter(1)
  ROOT %convolution.9 = f32[8,3,3,96]{3,2,1,0} convolution(%param_0, %param_1), \
window={size=96x96 pad=1_1x1_1}, dim_labels=f01b_01io->f01b, feature_group_count=8
}

ENTRY %main (x: f32[8,96,96,4], w: f32[3,3,4,16], g: f32[8,96,96,8]) -> f32[8,96,96,16] {
  %x = f32[8,96,96,4]{3,2,1,0} parameter(0)
  %w = f32[3,3,4,16]{3,2,1,0} parameter(1)
  %g = f32[8,96,96,8]{3,2,1,0} parameter(2)
  %ynn_fusion = f32[8,3,3,96]{3,2,1,0} fusion(%g, %x), kind=kCustom, \
calls=%fused_computation, backend_config={"fusion_config":{"kind":"__ynn_fusion"}}
  ROOT %conv = f32[8,96,96,16]{3,2,1,0} convolution(%x, %w), window={size=3x3 pad=1_1x1_1}, \
dim_labels=b01f_01io->b01f
}
"""


def test_classify_attributes_each_convolution_to_its_computation():
  counts = conv_hlo.classify(HLO)
  assert counts["ynn_fusions"] == 1
  assert counts["ynn_convolutions"] == 1 and counts["xla_convolutions"] == 1
  ynn, xla = sorted(counts["convolutions"], key=lambda c: c["where"], reverse=True)
  assert ynn["where"] == "ynn" and ynn["kind"] == "weight gradient"
  assert ynn["feature_group_count"] == 8 and ynn["window"] == [96, 96]
  assert xla["where"] == "xla" and xla["kind"] == "forward or input gradient"
  assert (xla["input_width"], xla["output_width"]) == (4, 16)
  assert counts["xla_narrow"] == 1 and counts["xla_weight_gradients"] == 0
  assert counts["xla_grouped"] == 0


def test_classify_finds_every_convolution_of_a_compiled_program():
  w = jnp.asarray(np.random.default_rng(0).normal(size=(3, 3, 4, 8)), jnp.float32)

  def f(x):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC")).sum()

  x = jnp.ones((1, 16, 16, 4), jnp.float32)
  counts = conv_hlo.classify(jax.jit(f).lower(x).compile().as_text())
  # One forward convolution, wherever XLA runs it.
  assert counts["ynn_convolutions"] + counts["xla_convolutions"] == 1
  (conv,) = counts["convolutions"]
  assert conv["kind"] == "forward or input gradient" and conv["window"] == [3, 3]
