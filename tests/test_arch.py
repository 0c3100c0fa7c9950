"""Every architecture through the shared train loop, raw-unit export and SAELens folders."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jumprelu import arch, baselines, export, run, sae
from tests.conftest import tiny

ARCH_OVERRIDES = {
    "jumprelu": {},
    "relu": {"sae.sparsity_coefficient": 0.3},
    "gated": {"sae.sparsity_coefficient": 0.3},
    "topk": {"sae.k": 4, "sae.k_aux": 16, "train.dead_window_tokens": 256},
    "batchtopk": {"sae.k": 4, "sae.k_aux": 16, "train.dead_window_tokens": 256},
}


def _trained_params(a, seed=0):
  """Params of architecture `a` moved off their init, so biases and r_mag are non-zero."""
  c = tiny(**{"sae.arch": a, **ARCH_OVERRIDES[a]})
  p = arch.init(c, jax.random.key(seed))
  keys = jax.random.split(jax.random.key(seed + 1), len(p))
  return c, {name: v + 0.05 * jax.random.normal(k, v.shape) if name != "log_threshold" else v
             for (name, v), k in zip(sorted(p.items()), keys)}


@pytest.mark.parametrize("a", sorted(ARCH_OVERRIDES))
def test_raw_export_acts_on_raw_activations(a):
  """Trained on x / C, exported for x: features scale by C, reconstructions are C·x̂(x / C)."""
  c, p = _trained_params(a)
  scale = 3.7
  raw = export.raw_params(a, p, scale, c.sae.k)
  name, k, arrays = arch.split_raw(raw)
  assert name == a and (k == 4 if a == "topk" else k is None)
  x = np.random.default_rng(0).normal(size=(32, 16)).astype(np.float32) * scale
  f_n = arch.features(p, x / scale, arch=a, k=c.sae.k)
  f_raw = arch.features(arrays, x, arch=a, k=k)
  np.testing.assert_allclose(f_raw, scale * f_n, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(sae.decode(arrays, f_raw), scale * sae.decode(p, f_n), rtol=1e-4,
                             atol=1e-4)
  assert np.mean(np.asarray(f_raw) != 0) > 0.02  # some features fire: the check has teeth


@pytest.mark.parametrize("a", sorted(ARCH_OVERRIDES))
def test_each_architecture_trains_and_exports(tmp_path, a):
  c = tiny(**{"sae.arch": a, "train.num_steps": 60, "train.log_every": 20,
              "optim.lr_warmup_steps": 10, "optim.sparsity_warmup_steps": 10,
              "optim.learning_rate": 3e-3, **ARCH_OVERRIDES[a]})
  run.train_and_evaluate(c, str(tmp_path))
  lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert lines[-1]["fvu"] < 0.7 * lines[0]["fvu"], lines  # it learns to reconstruct
  assert ("in_window" in lines[-1]) == (a == "jumprelu")
  assert ("auxk" in lines[-1]) == (a in ("topk", "batchtopk"))
  if a in ("topk", "batchtopk"):
    assert all(r["l0"] <= 4 for r in lines)
  npz = export.load(str(tmp_path / "export" / "params.npz"))
  folder, cfg = export.load_saelens(str(tmp_path / "export" / "saelens"))
  assert cfg["architecture"] == export.SAELENS_ARCH[a] and arch.name_of(npz) == a
  if a == "batchtopk":  # SAELens holds its inference SAE: a JumpReLU with a global threshold
    assert arch.name_of(folder) == "jumprelu" and np.ptp(npz["threshold"]) == 0
    assert npz["threshold"][0] > 0  # the running estimate was written, in raw units
    npz = {k: v for k, v in npz.items() if k != "architecture"}
  assert sorted(folder) == sorted(npz)
  for key in npz:
    np.testing.assert_array_equal(folder[key], npz[key])


def test_saelens_files_use_its_names_and_flags(tmp_path):
  """SAELens 6 names: Gated's encoder is W_enc, it reads x − b_dec; TopK records k. (Loading
  these folders with SAE.load_from_disk of sae-lens 6.54 gave the same features to 1.4e-6.)"""
  from safetensors.numpy import load_file
  for a in ("relu", "gated", "topk"):
    c, p = _trained_params(a)
    raw = export.raw_params(a, p, 2.0, c.sae.k)
    d = tmp_path / a
    export.save_saelens(str(d), raw, model_name="m", hook_name="blocks.1.hook_resid_post",
                         context_size=8, dataset_path="t", density_F=np.full(64, 0.01))
    cfg = json.load(open(d / "cfg.json"))
    weights = load_file(str(d / "sae_weights.safetensors"))
    assert cfg["apply_b_dec_to_input"] == (a == "gated")
    if a == "gated":
      assert sorted(weights) == ["W_dec", "W_enc", "b_dec", "b_gate", "b_mag", "r_mag"]
      np.testing.assert_array_equal(weights["W_enc"], raw["W_gate"])
    else:
      assert sorted(weights) == ["W_dec", "W_enc", "b_dec", "b_enc"]
    assert cfg.get("k") == (4 if a == "topk" else None)


def test_saelens_standard_sae_with_b_dec_on_input_is_folded(tmp_path):
  """A SAELens standard SAE that encodes x − b_dec loads as one that encodes x."""
  _, p = _trained_params("relu")
  raw = export.raw_params("relu", p, 1.0)
  export.save_saelens(str(tmp_path), raw, model_name="m", hook_name="h", context_size=8,
                       dataset_path="t")
  cfg = json.load(open(tmp_path / "cfg.json"))
  cfg["apply_b_dec_to_input"] = True
  json.dump(cfg, open(tmp_path / "cfg.json", "w"))
  loaded, _ = export.load_saelens(str(tmp_path))
  x = np.random.default_rng(1).normal(size=(8, 16)).astype(np.float32)
  expected = np.maximum((x - raw["b_dec"]) @ raw["W_enc"] + raw["b_enc"], 0)
  np.testing.assert_allclose(arch.features(arch.split_raw(loaded)[2], x, arch="relu"), expected,
                             rtol=1e-5, atol=1e-6)


def test_topk_with_traced_k_matches_static_k():
  """The ensemble's TopK (k traced, bounded by k_max) keeps exactly top_k(k)'s latents."""
  _, p = _trained_params("topk")
  x = np.random.default_rng(2).normal(size=(32, 16)).astype(np.float32)
  traced = jax.jit(lambda k: baselines.topk_encode(p, x, k=k, k_max=9)[0])
  static = jax.jit(lambda k: baselines.topk_encode(p, x, k=k)[0], static_argnums=0)
  for k in (1, 4, 9):
    np.testing.assert_array_equal(traced(jnp.int32(k)), static(k))


def test_unknown_architecture_in_a_file_is_named(tmp_path):
  with pytest.raises(ValueError, match="unknown SAE architecture 'sparse_coder'"):
    arch.name_of({"architecture": np.asarray("sparse_coder")})
  path = str(tmp_path / "params.npz")
  np.savez(path, W_enc=np.zeros((2, 4)), architecture=np.asarray("topk"))
  with pytest.raises(KeyError, match="lacks .*'b_enc'.*a topk export has"):
    export.load(path)
