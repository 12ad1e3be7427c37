"""The optimiser: Adam for the first epochs, then plain SGD, in one optax chain.

The chain's state never changes shape: the Adam direction (with torch-style weight decay
added to the gradient) is applied only while `step < switch_step`; afterwards the gradient
passes through unchanged. One learning-rate schedule then scales the update, so after the
switch an update is exactly `-learning_rate * gradient` (no momentum, no decay), which is
what TracIn assumes of eta_t.
"""

from __future__ import annotations

import dataclasses

import optax

from tracin_jax.settings import setting


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """Adam-then-SGD settings (the paper: Adam 1e-4, weight decay 1e-5, 5 epochs)."""

  adam_epochs: int = setting(5, "Epochs with Adam before the switch to plain SGD.", minimum=0)
  adam_learning_rate: float = setting(1e-4, "Adam learning rate.", minimum=0.0, exclusive=True)
  weight_decay: float = setting(1e-5, "Adam weight decay (added to the gradient, as "
                                "torch.optim.Adam).", minimum=0.0)
  sgd_learning_rate: float = setting(1e-2, "Plain SGD learning rate (TracIn's eta_t).",
                                     minimum=0.0, exclusive=True)


def learning_rate_schedule(config: OptimizerConfig, steps_per_epoch: int) -> optax.Schedule:
  """eta(step): the rate applied by the update with 0-based index `step`."""
  switch = config.adam_epochs * steps_per_epoch
  return optax.join_schedules(
      [optax.constant_schedule(config.adam_learning_rate),
       optax.constant_schedule(config.sgd_learning_rate)],
      [switch])


def make_optimizer(config: OptimizerConfig, steps_per_epoch: int):
  """Builds the chain and its schedule.

  Args:
    config: optimiser settings.
    steps_per_epoch: updates per epoch; the switch happens after
      `adam_epochs * steps_per_epoch` updates.

  Returns:
    (optax.GradientTransformation, schedule).
  """
  if steps_per_epoch <= 0:
    raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}.")
  switch = config.adam_epochs * steps_per_epoch
  adam_direction = optax.chain(
      optax.add_decayed_weights(config.weight_decay), optax.scale_by_adam())
  schedule = learning_rate_schedule(config, steps_per_epoch)
  tx = optax.chain(
      optax.transforms.conditionally_transform(adam_direction, lambda step: step < switch),
      optax.scale_by_learning_rate(schedule),
  )
  return tx, schedule


def phase_at(config: OptimizerConfig, steps_per_epoch: int, step: int) -> str:
  """'adam' or 'sgd': the phase of the update with 0-based index `step`."""
  return "adam" if step < config.adam_epochs * steps_per_epoch else "sgd"
