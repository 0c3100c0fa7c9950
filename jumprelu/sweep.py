"""Sweeps over λ, ε, k and the target L0 trained as one vmapped ensemble.

The grid is the product of the non-empty `sweep.*` tuples. Every member starts from the same
initial params (the config's seed) and sees the same batches, so members differ only in their
hyperparameters; that also makes member i's run identical, up to float reduction order, to a
run of `member_config(c, hp_i)` alone (tested). The stacked state carries a leading member axis
[S] on every per-SAE leaf (params, optimiser state, dead-feature counters); the step counter
and the input scale are shared.
"""
import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np

AXES = ("sparsity_coefficient", "bandwidth", "k", "target_l0")
_SHORT = {"sparsity_coefficient": "lam", "bandwidth": "eps", "k": "k", "target_l0": "l0"}


def is_sweep(c) -> bool:
  return any(len(c.sweep[a]) for a in AXES)


def grid(c) -> list[tuple[str, dict]]:
  """[(member name, hp)] over the product of the non-empty sweep axes; hp has every AXES key.

  Names list the swept values only, e.g. "lam=0.001" or "lam=0.001_eps=0.002"."""
  swept = [a for a in AXES if len(c.sweep[a])]
  if not swept:
    return []
  out = []
  for values in itertools.product(*(c.sweep[a] for a in swept)):
    hp = {"sparsity_coefficient": c.sae.sparsity_coefficient, "bandwidth": c.sae.bandwidth,
          "k": c.sae.k, "target_l0": c.sae.target_l0, **dict(zip(swept, values))}
    name = "_".join(f"{_SHORT[a]}={v:g}" for a, v in zip(swept, values))
    out.append((name, hp))
  return out


def member_config(c, hp: dict, store: str | None = None):
  """The config of one member as a run of its own: sae.* set from hp, no sweep, and the
  ensemble's activation store (so it is found from the member's directory)."""
  m = c.copy_and_resolve_references()
  with m.unlocked():
    for a in AXES:
      m.sae[a] = type(c.sae[a])(hp[a])
      m.sweep[a] = ()
    if store is not None and m.data.source in ("npy", "harvest"):
      m.data.path = store if "://" in store else os.path.abspath(store)  # gs://… as it is
  return m


def member_dir(workdir: str, name: str) -> str:
  return os.path.join(workdir, "members", name)


def stacked_hparams(members: list[tuple[str, dict]]) -> dict:
  """{axis: [S] array} of the members' hyperparameters, the vmapped argument of the step."""
  return {a: jnp.asarray([hp[a] for _, hp in members], jnp.int32 if a == "k" else jnp.float32)
          for a in AXES}


def stack(tree, n: int):
  """n copies of every leaf along a new leading axis."""
  return jax.tree.map(lambda a: jnp.broadcast_to(a, (n, *np.shape(a))), tree)


def take(tree, i: int):
  """Member i's slice of every leaf of a stacked tree."""
  return jax.tree.map(lambda a: a[i], tree)


def split_metrics(record: dict, name: str) -> dict:
  """One member's entries of an ensemble's metrics record ("l0/NAME" -> "l0"), shared ones kept."""
  out = {}
  for key, value in record.items():
    if "/" not in key:
      out[key] = value
    elif key.endswith("/" + name):
      out[key[:-len(name) - 1]] = value
  return out
