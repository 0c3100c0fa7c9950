"""Sweeps: a grid of SAEs trained as one vmapped ensemble, each member a run of its own."""
import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from jumprelu import (checkpoint, evaluate, export, run, sharding, sweep, train,
                      validate)
from jumprelu.lm import activations as lm_act
from tests.conftest import killed_then_resumed, tiny
from tests.tiny_lm import tiny_lm

# Members differ from the same SAE trained alone only by float reduction order (vmapped vs
# plain matmuls): measured max |diff| ≤ 2.4e-7 after 30 steps, for every architecture.
MEMBER_ATOL = 1e-5

SWEEPS = {
    "jumprelu": {"sweep.sparsity_coefficient": (1e-3, 3e-2), "sweep.bandwidth": (1e-2,)},
    "topk": {"sweep.k": (2, 5), "sae.k_aux": 16, "train.dead_window_tokens": 128},
    "gated": {"sweep.sparsity_coefficient": (0.1, 1.0)},
    "batchtopk": {"sweep.k": (2, 5), "sae.k_aux": 16, "train.dead_window_tokens": 128},
}


def _config(arch, **kw):
  return tiny(**{"sae.arch": arch, **SWEEPS[arch], "train.num_steps": 20,
                 "optim.sparsity_warmup_steps": 10, "optim.lr_warmup_steps": 5,
                 "optim.learning_rate": 3e-3, "log.tensorboard": False, **kw})


def _params(path):
  return export.load(os.path.join(path, "export", "params.npz"))


@pytest.mark.parametrize("arch", sorted(SWEEPS))
def test_each_member_equals_training_it_alone(tmp_path, arch):
  c = _config(arch)
  summary = run.train_and_evaluate(c, str(tmp_path / "sweep"))
  members = sweep.grid(c)
  assert sorted(summary["members"]) == sorted(name for name, _ in members)
  assert len(members) == 2
  finals = []
  for name, hp in members:
    alone = tmp_path / f"alone_{name}"
    alone_summary = run.train_and_evaluate(sweep.member_config(c, hp), str(alone))
    ours, ref = _params(tmp_path / "sweep" / "members" / name), _params(alone)
    assert sorted(ours) == sorted(ref)
    for key in ref:
      if key != "architecture":
        np.testing.assert_allclose(ours[key], ref[key], rtol=0, atol=MEMBER_ATOL, err_msg=key)
    member_final = summary["members"][name]["final"]
    assert member_final["l0"] == pytest.approx(alone_summary["final"]["l0"], abs=1e-3)
    finals.append(member_final["l0"])
  assert len(set(finals)) > 1  # the members really trained with different hyperparameters


def test_member_directory_is_a_finished_run_of_its_own(tmp_path):
  c = _config("jumprelu")
  workdir = tmp_path / "sweep"
  run.train_and_evaluate(c, str(workdir))
  name, hp = sweep.grid(c)[1]
  mdir = workdir / "members" / name
  mc = sweep.member_config(c, hp)
  assert json.load(open(mdir / "config.json"))["sae"]["bandwidth"] == hp["bandwidth"]
  lines = [json.loads(line) for line in open(mdir / "metrics.jsonl")]
  assert [r["step"] for r in lines] == [4, 8, 12, 16, 20]
  assert all("l0" in r and "/" not in "".join(r) for r in lines)
  assert os.path.isfile(mdir / "export" / "saelens" / "cfg.json")
  # train.py on the member's config and directory finds its final checkpoint (no retraining)
  # and exports the same params again.
  before = _params(mdir)
  again = run.train_and_evaluate(mc, str(mdir))
  assert again["final"]["step"] == 20
  for key, value in _params(mdir).items():
    np.testing.assert_array_equal(value, before[key])
  # The checkpoint restores as a single-SAE state onto the member's own config.
  abstract = jax.eval_shape(lambda: train.init_state(mc, jax.random.key(0), 1.0))
  mesh = sharding.make_mesh(1, 1)
  state = checkpoint.restore_latest(checkpoint.manager(str(mdir), 2),
                                    checkpoint.abstract_like(
                                        abstract, sharding.tree_shardings(mesh, abstract)))
  assert int(state.step) == 20 and state.params["W_enc"].shape == (16, 64)


def test_interrupted_ensemble_resumes_identically(tmp_path, monkeypatch):
  c = _config("topk")
  run.train_and_evaluate(c, str(tmp_path / "whole"))
  exported_before = []

  def again():
    exported_before.append(os.path.exists(tmp_path / "resumed" / "members"))
    return run.train_and_evaluate(c, str(tmp_path / "resumed"))

  killed_then_resumed(monkeypatch, again)
  assert exported_before == [False, False]  # the killed run exported nothing half-way
  for name, _ in sweep.grid(c):
    a, b = (_params(tmp_path / d / "members" / name) for d in ("whole", "resumed"))
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_ensemble_shards_the_dictionary_like_one_sae(tmp_path):
  """On a (2, 4) mesh each member's W_enc columns are split over "model"; same result."""
  c = _config("jumprelu")
  ref = run.train_and_evaluate(c, str(tmp_path / "one"))
  split = run.train_and_evaluate(_config("jumprelu", **{"mesh.data": 2, "mesh.model": 4}),
                                   str(tmp_path / "mesh"))
  mesh = sharding.make_mesh(2, 4)
  abstract = jax.eval_shape(lambda: train.init_state(c, jax.random.key(0), 1.0, 2))
  specs = sharding.tree_shardings(mesh, abstract)
  assert specs.params["W_enc"].spec == sharding.P(None, None, "model")
  assert specs.params["W_dec"].spec == sharding.P(None, "model", None)
  assert specs.tokens_since_fired.spec == sharding.P(None, "model")
  for name in ref["members"]:
    assert split["members"][name]["final"]["l0"] == pytest.approx(
        ref["members"][name]["final"]["l0"], abs=0.05)
    a, b = (_params(tmp_path / d / "members" / name) for d in ("one", "mesh"))
    np.testing.assert_allclose(a["W_dec"], b["W_dec"], atol=1e-4)


def test_grid_names_and_member_configs():
  c = tiny(**{"sweep.sparsity_coefficient": (1e-3, 3e-3), "sweep.bandwidth": (0.002,)})
  members = sweep.grid(c)
  assert [name for name, _ in members] == ["lam=0.001_eps=0.002", "lam=0.003_eps=0.002"]
  mc = sweep.member_config(c, members[1][1])
  assert (mc.sae.sparsity_coefficient, mc.sae.bandwidth, mc.sweep.sparsity_coefficient) == (
      3e-3, 0.002, ())
  assert sweep.grid(tiny()) == [] and not sweep.is_sweep(tiny())


@pytest.mark.parametrize("overrides, message", [
    ({"sweep.k": (4, 8)}, "sweep.k must be empty: sae.arch='jumprelu' does not use it"),
    ({"sae.arch": "topk", "sweep.sparsity_coefficient": (1.0,)},
     "sweep.sparsity_coefficient must be empty: sae.arch='topk'"),
    ({"sweep.bandwidth": (1e-3, -1e-3)}, "sweep.bandwidth must be a tuple of distinct values > 0"),
    ({"sweep.sparsity_coefficient": (1e-3, 1e-3)}, "sweep.sparsity_coefficient must be a tuple"),
    ({"sae.arch": "topk", "sweep.k": (4, 65)}, "sweep.k must be a tuple of distinct ints in [1, "
                                               "sae.width=64]"),
    ({"sae.arch": "tokp"}, "sae.arch must be one of ('jumprelu', 'relu', 'gated', 'topk', "
                           "'batchtopk')"),
    ({"sae.arch": "topk", "sae.k": 0}, "sae.k must be an int in [1, sae.width=64], got 0"),
])
def test_bad_sweeps_are_refused_before_compute(overrides, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")
                     .replace("[", r"\[").replace("]", r"\]")):
    validate.check_config(tiny(**overrides))


def test_sweep_job_evaluates_every_member_on_the_lm(tmp_path, monkeypatch):
  """run.train_and_evaluate (train.py) on a harvested store evaluates each member into its eval.json;
  experiments/evaluate.py's path, from the sweep's config.json, gives the same numbers."""
  lm = tiny_lm()
  monkeypatch.setattr(lm_act, "load_lm", lambda c: lm)
  c = tiny("harvest", **{"lm.model_path": "/nowhere/tiny-random", "lm.batch_contexts": 8,
                         "harvest.num_tokens": 600, "harvest.shard_tokens": 512,
                         "data.norm_rows": 256, "eval.num_contexts": 4, "eval.skip_contexts": 400,
                         "sae.arch": "topk", "sweep.k": (2, 6), "sae.k_aux": 16,
                         "log.tensorboard": False})
  summary = run.train_and_evaluate(c, str(tmp_path))
  records = {}
  for name, k in (("k=2", 2), ("k=6", 6)):
    r = json.load(open(tmp_path / "members" / name / "eval.json"))
    assert (r["arch"], r["k"], r["member"], r["sparsity_coefficient"]) == ("topk", k, name, None)
    assert 0 < r["l0"] <= k and len(r["firing_frequency"]) == 64
    assert summary["members"][name]["eval"]["delta_lm_loss"] == r["delta_lm_loss"]
    records[name] = r
  assert records["k=6"]["l0"] > records["k=2"]["l0"]
  read_back = ml_collections.ConfigDict(json.load(open(tmp_path / "config.json")))
  again = evaluate.evaluate_workdir(read_back, str(tmp_path))
  for r in again:
    assert r["delta_lm_loss"] == pytest.approx(records[r["member"]]["delta_lm_loss"], abs=1e-6)
