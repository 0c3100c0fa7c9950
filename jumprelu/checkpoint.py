"""Orbax checkpoints of the train state: saved and restored by every process, onto any mesh.

A save is asynchronous: orbax writes into `STEP.orbax-checkpoint-tmp-*` and renames it to `STEP`
only once everything (and `commit_success.txt`) is on disk, so a kill mid-save leaves a temporary
directory that is never restored (and is removed, with a warning, by the next run); a save that
fails (a full disk) stops training at the next step boundary, with its error (saved()). Each
checkpoint also records a fingerprint of its arrays, because a damaged data file can restore
without any error. A committed step that is unreadable, lacks its commit marker or fails its
fingerprint is moved to DIR/checkpoints_rejected/ with a warning and the previous one is used.
"""
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

COMMIT_MARKER = "commit_success.txt"  # orbax writes it last, just before the rename
_TMP = re.compile(r"^(\d+)\.orbax-checkpoint-tmp")


def _not_orbax(record) -> bool:
  if "orbax" not in record.pathname:
    return True
  if record.exc_info and logging.get_verbosity() < logging.DEBUG:
    # A failed save's traceback, logged once per orbax thread: saved() raises the error itself
    # (the entry points show its traceback on --traceback or --verbosity=1).
    record.exc_info = record.exc_text = None
  return record.levelno >= logging.converter.STANDARD_WARNING


def manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  """A CheckpointManager under DIR/checkpoints that lists only committed steps."""
  handler = logging.get_absl_handler()
  if _not_orbax not in handler.filters:  # orbax logs dozens of INFO lines per save
    handler.addFilter(_not_orbax)
  directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
  if os.path.isdir(directory) and jax.process_index() == 0:
    for name in sorted(os.listdir(directory)):
      if m := _TMP.match(name):
        logging.warning("skipping the checkpoint of step %s: its save never finished (the run "
                        "was killed while writing it); removing %s", m.group(1), name)
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         cleanup_tmp_directories=True)
  mngr = ocp.CheckpointManager(directory, options=options,
                               item_handlers=ocp.StandardCheckpointHandler())
  # JAX's preemption sync point must be asked once per step, in order, by the host loop alone:
  # orbax also asks it (for its own logs) from its commit thread with an older step, and a host
  # that reports that older step can pick another save step than the rest (and all hang).
  mngr.reached_preemption = lambda step: False
  return mngr


# ----------------------------------------------------------------------------- fingerprints

def _bits(x):
  """The raw bits of each element as uint32 (8-byte elements become two words)."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
  return jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32)


@jax.jit
def _fingerprint_leaves(leaves):
  # Σ bits_i·(2i+1) mod 2³²: an odd weight changes with any single word and the position, and
  # wrapping integer sums are exact in any order, so every mesh gets the same number.
  def one(x):
    bits = _bits(x)
    weight = jnp.zeros(bits.shape, jnp.uint32)  # the row-major position i
    for axis in range(bits.ndim):
      weight = weight * np.uint32(bits.shape[axis]) + jax.lax.broadcasted_iota(
          jnp.uint32, bits.shape, axis)
    return jnp.sum(bits * (2 * weight + 1), dtype=jnp.uint32)
  return [one(x) for x in leaves]


def fingerprint(state) -> list[int]:
  """One uint32 checksum per array of `state` (sharded or not, on one process or many)."""
  return [int(np.asarray(v.addressable_data(0)))
          for v in _fingerprint_leaves(jax.tree.leaves(state))]


def layout(state) -> list[str]:
  """'path shape dtype' of every array: what a checkpoint must hold to restore into `state`."""
  return [f"{jax.tree_util.keystr(p)} {tuple(x.shape)} {np.dtype(x.dtype).name}"
          for p, x in jax.tree_util.tree_leaves_with_path(state)]


# ----------------------------------------------------------------------------- save / restore

def save(mngr: ocp.CheckpointManager, step: int, state) -> None:
  """Starts an asynchronous save of `state` as `step`, with its fingerprint and layout."""
  meta = {"fingerprint": fingerprint(state), "layout": layout(state)}
  mngr.save(step, args=ocp.args.StandardSave(state), custom_metadata=meta, force=True)


def saved(mngr: ocp.CheckpointManager, wait: bool = False) -> bool:
  """True once no save is in flight (waiting for it if `wait`); raises the error of a save that
  failed (a full disk, say), so training stops at once, not at the next save's wait."""
  if not wait and mngr.is_saving_in_progress():  # ~12 µs, asked only while a save runs
    return False
  try:
    mngr.wait_until_finished()  # returns at once when done; re-raises a failed save's error
  except Exception as e:
    note = f"while saving a checkpoint into {mngr.directory}"
    if note not in getattr(e, "__notes__", ()):
      e.add_note(note)
    raise
  return True


def _all_agree(ok: bool) -> bool:
  """True when `ok` holds on every process (so all processes take the same branch)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


def _try_restore(mngr, step: int, abstract_state):
  """(state, None) for a good checkpoint, or (None, why it cannot be used)."""
  state, why = None, None
  path = os.path.join(str(mngr.directory), str(step))
  meta = {}
  if not os.path.exists(os.path.join(path, COMMIT_MARKER)):
    why = f"it has no commit marker ({COMMIT_MARKER}), so its save may not have finished"
  else:
    try:
      meta = mngr.metadata(step).custom_metadata or {}
    except Exception:  # orbax already logged the cause
      pass
    if "fingerprint" not in meta or "layout" not in meta:
      why = "its metadata (_CHECKPOINT_METADATA) is missing or damaged, so it cannot be verified"
  if why is None and meta["layout"] != layout(abstract_state):
    raise ValueError(
        f"the checkpoint at step {step} in {mngr.directory} holds a train state of another "
        f"layout ({meta['layout']} vs {layout(abstract_state)}); it was written by another "
        "version of jumprelu. Use a new --workdir, or delete its checkpoints/ to start over")
  if why is None:
    try:
      state = mngr.restore(step, args=ocp.args.StandardRestore(abstract_state))
    except Exception as e:  # any damage to the files shows up here, as any exception type
      why = f"it cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
  if not _all_agree(why is None):
    return None, why or "another process could not read it"
  bad = [name.split(" ")[0] for name, a, b in zip(layout(abstract_state), fingerprint(state),
                                                  meta["fingerprint"]) if a != b]
  if bad:
    return None, f"its data does not match the fingerprint saved with it (damaged: {bad})"
  return state, None


def _move_aside(mngr, step: int) -> str:
  """Moves a rejected step to DIR/checkpoints_rejected/ (kept for inspection, never deleted)."""
  src = os.path.join(str(mngr.directory), str(step))
  root = os.path.join(os.path.dirname(str(mngr.directory)), "checkpoints_rejected")
  dst, n = os.path.join(root, str(step)), 1
  while os.path.exists(dst):
    dst, n = os.path.join(root, f"{step}.{n}"), n + 1
  if jax.process_index() == 0:
    os.makedirs(root, exist_ok=True)
    os.rename(src, dst)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"jumprelu_reject_checkpoint_{step}")
  mngr.reload()
  return dst


def restore_latest(mngr: ocp.CheckpointManager, abstract_state):
  """The newest intact checkpoint, laid out as `abstract_state` (ShapeDtypeStructs with
  shardings, so a checkpoint written on one mesh restores onto another), or None if none is.
  Each newer step that cannot be used is moved aside, with a warning naming it and why."""
  for step in sorted(mngr.all_steps(), reverse=True):
    state, why = _try_restore(mngr, step, abstract_state)
    if state is not None:
      return state
    dst = _move_aside(mngr, step)
    older = [s for s in mngr.all_steps() if s < step]
    logging.warning("skipping the checkpoint at step %d: %s. Moved it to %s; %s", step, why, dst,
                    f"falling back to step {max(older)}" if older else
                    "no older checkpoint is left, so training starts from step 0")
  return None


def abstract_like(state, shardings):
  """ShapeDtypeStructs of `state` carrying the given shardings (the restore target)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state, shardings)
