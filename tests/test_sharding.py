"""The train step on (data, model) meshes of 8 faked CPU devices, against one device."""
import chex
import jax
import numpy as np
import pytest

from jumprelu import arch as arch_lib
from jumprelu import checkpoint, run, sharding, train
from tests.conftest import tiny

# Sharding changes only the order of float32 reductions (over the batch for the gradients, over
# F for the metrics), so parameters agree to rounding; Adam (β1 = 0) rescales each gradient to
# ~lr per step, so 20 steps keep differences at a few ulps of lr·20 = 2e-2.
ATOL = 2e-5


def _run(c, mesh_shape, steps, state=None):
  mesh = sharding.make_mesh(*mesh_shape)
  sharding.check_divisible(mesh, c.sae.width, c.train.batch_size)
  source, _ = run.make_source(c)
  abstract = jax.eval_shape(lambda: train.init_state(c, jax.random.key(0), 1.0))
  shardings = sharding.tree_shardings(mesh, abstract)
  if state is None:
    state, _ = train.sharded_init(c, mesh, jax.random.key(c.seed), 2.0)
  else:
    state = jax.device_put(state, shardings)
  chex.clear_trace_counter()  # each run builds its own jitted step; each must trace once
  step_fn = train.jit_train_step(c, mesh, shardings,
                                 step_fn=chex.assert_max_traces(train.train_step, n=1))
  start = int(state.step)
  for s in range(start, start + steps):
    x = sharding.global_batch(mesh, source.batch(s, c.train.batch_size), c.train.batch_size)
    state, metrics = step_fn(state, x)
  return state, jax.device_get(metrics)


@pytest.fixture(scope="module")
def single_device():
  c = tiny(**{"sae.width": 64, "train.batch_size": 64})
  return c, _run(c, (1, 1), 20)


@pytest.mark.parametrize("mesh_shape", [(1, 8), (2, 4), (8, 1)])
def test_meshes_match_one_device(single_device, mesh_shape):
  c, (ref, ref_metrics) = single_device
  state, metrics = _run(c, mesh_shape, 20)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ref), jax.tree.leaves(state)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=ATOL, rtol=0,
                               err_msg=jax.tree_util.keystr(path))
  for k in ref_metrics:
    np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_each_device_holds_its_slice_of_the_dictionary():
  c = tiny(**{"sae.width": 64})
  mesh = sharding.make_mesh(2, 4)
  state, _ = train.sharded_init(c, mesh, jax.random.key(0), 1.0)
  for shard in state.params["W_enc"].addressable_shards:
    assert shard.data.shape == (c.data.d_in, 64 // 4)
  for shard in state.params["W_dec"].addressable_shards:
    assert shard.data.shape == (64 // 4, c.data.d_in)
  for shard in state.opt_state[0].nu["W_enc"].addressable_shards:  # Adam state follows
    assert shard.data.shape == (c.data.d_in, 64 // 4)
  assert len(state.params["b_dec"].sharding.device_set) == 8  # replicated


def _restore(workdir, c, mesh_shape):
  mesh = sharding.make_mesh(*mesh_shape)
  abstract = jax.eval_shape(lambda: train.init_state(c, jax.random.key(0), 1.0))
  return checkpoint.restore_latest(
      checkpoint.manager(str(workdir), 2),
      checkpoint.abstract_like(abstract, sharding.tree_shardings(mesh, abstract)))


def test_checkpoint_from_one_mesh_restores_on_another(tmp_path):
  c = tiny(**{"sae.width": 64, "train.batch_size": 64, "train.num_steps": 20,
              "train.checkpoint_every": 10, "mesh.data": 2, "mesh.model": 4})
  run.train_and_evaluate(c, str(tmp_path / "whole"))  # 20 steps on (2, 4)

  c.train.num_steps = 10
  run.train_and_evaluate(c, str(tmp_path / "moved"))  # 10 steps on (2, 4) ...
  c.train.num_steps, c.mesh.data, c.mesh.model = 20, 8, 1
  summary = run.train_and_evaluate(c, str(tmp_path / "moved"))  # ... then 10 on (8, 1)
  assert summary["final"]["step"] == 20

  whole, moved = _restore(tmp_path / "whole", c, (2, 4)), _restore(tmp_path / "moved", c, (8, 1))
  assert moved.params["W_enc"].sharding.mesh.shape["data"] == 8
  assert int(moved.step) == 20
  for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(moved)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=ATOL, rtol=0)


@pytest.mark.parametrize("overrides,message", [
    ({"sae.width": 60, "mesh.model": 8}, r"sae.width=60 is not divisible by mesh.model=8"),
    ({"train.batch_size": 60, "mesh.data": 8}, r"train.batch_size=60 is not divisible by "
                                               r"mesh.data=8"),
    ({"mesh.data": 4, "mesh.model": 4}, r"needs 16 devices, but only 8 are visible"),
])
def test_mesh_errors_before_compiling(tmp_path, overrides, message):
  with pytest.raises(ValueError, match=message):
    run.train_and_evaluate(tiny(**overrides), str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()


def test_automatic_mesh_shape():
  assert sharding.mesh_shape(-1, 1, 8) == (8, 1)
  assert sharding.mesh_shape(1, -1, 8) == (1, 8)
  assert sharding.mesh_shape(2, -1, 8) == (2, 4)
  with pytest.raises(ValueError, match="cannot both be -1"):
    sharding.mesh_shape(-1, -1, 8)


def test_every_state_leaf_has_a_declared_layout():
  mesh = sharding.make_mesh(2, 4)
  for arch in arch_lib.ARCHS:  # every leaf of every train state is named
    c = tiny(**{"sae.arch": arch})
    sharding.tree_shardings(mesh, jax.eval_shape(lambda: train.init_state(c, jax.random.key(0),
                                                                          1.0)))
  # A leaf the table does not name is refused, not silently replicated over "model".
  with pytest.raises(ValueError, match=r"\['W_new'\].*add 'W_new' to sharding.PARAM_SPECS"):
    sharding.tree_shardings(mesh, {"W_new": jax.ShapeDtypeStruct((16, 64), np.float32)})
  with pytest.raises(ValueError, match=r"shape \(3, 2, 16, 64\).*PARAM_SPECS\[.W_enc.\]"):
    sharding.tree_shardings(mesh, {"W_enc": jax.ShapeDtypeStruct((3, 2, 16, 64), np.float32)})
