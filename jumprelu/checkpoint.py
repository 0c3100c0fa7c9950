"""Orbax checkpoints of the train state: saved and restored by every process, onto any mesh."""
import os

import jax
import orbax.checkpoint as ocp
from absl import logging


def _not_orbax(record) -> bool:
  return "orbax" not in record.pathname or record.levelno >= logging.converter.STANDARD_WARNING


def manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  """A CheckpointManager under DIR/checkpoints; orbax only lists fully committed steps."""
  handler = logging.get_absl_handler()
  if _not_orbax not in handler.filters:  # orbax logs dozens of INFO lines per save
    handler.addFilter(_not_orbax)
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                               options=options)


def save(mngr: ocp.CheckpointManager, step: int, state) -> None:
  mngr.save(step, args=ocp.args.StandardSave(state), force=True)


def restore_latest(mngr: ocp.CheckpointManager, abstract_state):
  """The newest checkpoint, laid out as `abstract_state` (ShapeDtypeStructs with shardings,
  so a checkpoint written on one mesh restores onto another), or None if there is none."""
  step = mngr.latest_step()
  if step is None:
    return None
  return mngr.restore(step, args=ocp.args.StandardRestore(abstract_state))


def abstract_like(state, shardings):
  """ShapeDtypeStructs of `state` carrying the given shardings (the restore target)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state, shardings)
