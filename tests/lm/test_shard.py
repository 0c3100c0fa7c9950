"""The LM on a ("data", "model") mesh of 8 faked CPU devices: the same activations and logits as
on one device, and each device's params read from only its slices of the safetensors file."""
import os
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jumprelu import sharding
from jumprelu.lm import activations as lm_act
from jumprelu.lm import load, model, shard
from tests import conftest, tiny_lm

SITE = model.Site("resid_post", 1)
# float32 throughout: a sharded matmul only reorders its sums (the all-reduce over "model").
RTOL = 1e-5  # of the largest |value| of the single-device result
MODEL_SIZES = (1, 2, 4)  # the tiny LMs' 4 query heads; data = 8 / model


@pytest.fixture(scope="module", params=["gemma2", "llama"])
def checkpoint(request, tmp_path_factory):
  path = str(tmp_path_factory.mktemp(request.param))
  tiny_lm.write_hf_checkpoint(path, request.param)
  params, cfg, _ = load.load_hf(path)
  tokens_BxL = np.random.RandomState(0).randint(0, cfg.vocab_size, (8, 12)).astype(np.int32)
  forward = jax.jit(model.forward, static_argnames=("cfg", "site"))
  logits, act = forward(params, cfg, tokens_BxL, site=SITE)
  return path, cfg, tokens_BxL, np.asarray(logits), np.asarray(act)


def assert_close(got, want):
  np.testing.assert_allclose(got, want, rtol=0, atol=RTOL * np.abs(want).max())


@pytest.mark.parametrize("model_size", MODEL_SIZES)
def test_sharded_logits_and_site_match_one_device(checkpoint, model_size):
  path, cfg, tokens_BxL, want_logits, want_act = checkpoint
  mesh = sharding.lm_mesh_of(model_size, jax.devices(), cfg)
  assert dict(mesh.shape) == {"data": 8 // model_size, "model": model_size}
  params, _, _ = shard.load_sharded(path, mesh)
  forward = jax.jit(
      lambda p, t: model.forward(p, cfg, t, site=SITE),
      in_shardings=(sharding.lm_shardings(cfg, mesh), sharding.lm_batch_sharding(mesh)))
  tokens_BxL = lm_act.tokens_on_mesh(mesh, tokens_BxL)
  compiled = forward.lower(params, tokens_BxL).compile()
  logits, act = compiled(params, tokens_BxL)
  assert act.sharding.spec[0] == "data"  # the batch stayed split: no device ran all of it
  # Megatron layout: devices exchange only activations (all-reduces of [B/data, L, D]), never
  # gather a weight.
  assert "all-gather" not in compiled.as_text()
  assert_close(np.asarray(logits), want_logits)
  assert_close(np.asarray(act), want_act)


def test_load_lm_site_fn_on_the_mesh(checkpoint):
  # The path harvest and live training take: config -> load_lm -> site_fn on host tokens.
  path, cfg, tokens_BxL, _, want_act = checkpoint
  if cfg.family != "gemma2":
    pytest.skip("the Gemma 2 checkpoint covers this path; one compile fewer")
  c = conftest.tiny("harvest", **{"lm.model_path": path, "lm.model_parallel": 2})
  params, lm_cfg, tokenizer, name = lm_act.load_lm(c)
  mesh = lm_act.mesh_of(params)
  assert dict(mesh.shape) == {"data": 4, "model": 2} and name == os.path.basename(path)
  assert params["layers"]["q_DxHDh"].sharding.spec == P(None, None, "model")
  act = lm_act.site_fn(lm_cfg, SITE)(params, tokens_BxL)
  assert_close(np.asarray(act), want_act)
  with pytest.raises(ValueError, match="lm.batch_contexts to a multiple of 4"):
    lm_act.site_fn(lm_cfg, SITE)(params, tokens_BxL[:6])


def test_each_device_reads_only_its_slices(tmp_path):
  # One device's callback reads 1/4 of every split tensor; the process reads each byte of the
  # file once, though two devices (data=2) hold each slice.
  path = str(tmp_path)
  cfg = tiny_lm.write_hf_checkpoint(path, "llama")
  mesh = sharding.lm_mesh_of(4, jax.devices(), cfg)
  params, _, reads = shard.load_sharded(path, mesh)
  specs = sharding.lm_param_specs(cfg, 4)
  with load.HFTensors(path) as tensors:
    file_bytes = {k: sum(tensors(n.format(i=i))[:].nbytes for i in range(cfg.n_layers))
                  if "{i}" in n else tensors(n)[:].nbytes for k, n in _flat(load.hf_names(cfg))}
  assert reads["total"] == sum(file_bytes.values())
  one_device = 0
  for key, spec in _flat(specs):
    if spec == P():  # replicated: read whole, once
      assert reads["slices"][key] == [file_bytes[key]], key
      one_device += file_bytes[key]
    else:
      assert reads["slices"][key] == [file_bytes[key] // 4] * 4, key
      one_device += file_bytes[key] // 4
  held = sum(a.addressable_shards[0].data.nbytes for a in jax.tree.leaves(params))
  assert held == one_device < 0.4 * reads["total"]


def test_bfloat16_params_and_checkpoint(tmp_path):
  path = str(tmp_path)
  cfg = tiny_lm.write_hf_checkpoint(path, "gemma2", dtype=ml_dtypes.bfloat16)
  mesh = sharding.lm_mesh_of(2, jax.devices(), cfg)
  params, _, reads = shard.load_sharded(path, mesh, "bfloat16")
  want, _, _ = load.load_hf(path)  # float32 on one device
  n_params = sum(a.size for a in jax.tree.leaves(want))
  assert reads["total"] == 2 * n_params  # two bytes a value, as stored
  for got, w in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
    assert got.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32), w)


def test_abstract_params_match_loaded(checkpoint, tmp_path):
  # Ahead-of-time compiles see the arrays load_sharded (HF) and put_on_mesh (GGUF) make, from a
  # directory holding only config.json.
  path, cfg, *_ = checkpoint
  shutil.copy(os.path.join(path, "config.json"), tmp_path)
  mesh = sharding.lm_mesh_of(4, jax.devices(), cfg)
  abstract = shard.abstract_params(load.hf_config(str(tmp_path)), mesh, "bfloat16")
  params, _, _ = shard.load_sharded(path, mesh, "bfloat16")
  placed = shard.put_on_mesh(load.load_hf(path)[0], cfg, mesh, "bfloat16")
  want = jax.tree.map(lambda a: (a.shape, a.dtype, a.sharding), abstract)
  assert jax.tree.map(lambda a: (a.shape, a.dtype, a.sharding), params) == want
  assert jax.tree.map(lambda a: (a.shape, a.dtype, a.sharding), placed) == want


def test_param_specs_follow_heads_and_divisibility():
  cfg = model.LMConfig(family="llama", vocab_size=300, d_model=16, n_layers=2, n_heads=8,
                       n_kv_heads=2, head_dim=4, d_ff=48, tie_embeddings=False)
  two, four = sharding.lm_param_specs(cfg, 2), sharding.lm_param_specs(cfg, 4)
  assert two["layers"]["k_DxKDh"] == P(None, None, "model")  # 2 KV heads over 2 devices
  assert four["layers"]["k_DxKDh"] == P()  # 2 KV heads cannot split over 4: replicated
  assert four["layers"]["q_DxHDh"] == P(None, None, "model")
  assert four["layers"]["o_HDhxD"] == P(None, "model", None)
  assert four["layers"]["down_FxD"] == P(None, "model", None)
  assert four["embed_VxD"] == P("model", None) and four["unembed_DxV"] == P(None, "model")
  assert sharding.lm_param_specs(cfg, 8)["embed_VxD"] == P()  # 300 tokens do not split by 8
  assert all(s == P() for k, s in four["layers"].items() if k.endswith("_D"))


def test_lm_mesh_refuses_bad_model_parallel():
  cfg = model.LMConfig(family="llama", vocab_size=256, d_model=16, n_layers=1, n_heads=4,
                       n_kv_heads=2, head_dim=4, d_ff=32)
  c = conftest.tiny("harvest", **{"lm.model_parallel": 8})
  with pytest.raises(ValueError, match=r"lm.model_parallel=8 .* 4 attention heads; choose "
                     r"one of \[1, 2, 4\]"):
    sharding.lm_mesh(c, lm_cfg=cfg)
  c.lm.model_parallel = 3
  with pytest.raises(ValueError, match=r"lm.model_parallel=3 .* 8 devices .* \[1, 2, 4, 8\]"):
    sharding.lm_mesh(c)
  c.lm.model_parallel = -1
  assert dict(sharding.lm_mesh(c).shape) == {"data": 1, "model": 8}


def _flat(tree):
  """[(path "layers/q_DxHDh", leaf)] of a params-shaped dict."""
  return [("/".join(k.key for k in path), leaf) for path, leaf in
          jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: isinstance(x, P))]


def test_load_sharded_refuses_a_checkpoint_it_would_misread(tmp_path):
  from safetensors.numpy import load_file, save_file
  path = str(tmp_path)
  cfg = tiny_lm.write_hf_checkpoint(path, "llama")
  mesh = sharding.lm_mesh_of(2, jax.devices(), cfg)
  file = os.path.join(path, "model.safetensors")
  tensors = load_file(file)
  save_file({**tensors, "model.layers.0.self_attn.q_norm.weight": np.ones(8, np.float32)}, file)
  with pytest.raises(ValueError, match=r"tensors this loader does not understand: \['model"
                     r".layers.0.self_attn.q_norm.weight'\]"):
    shard.load_sharded(path, mesh)
  del tensors["model.layers.1.mlp.up_proj.weight"]
  save_file(tensors, file)
  with pytest.raises(KeyError, match="lacks tensor 'model.layers.1.mlp.up_proj.weight'"):
    shard.load_sharded(path, mesh)


def test_config_checks_the_lm_placement_keys():
  from jumprelu import validate
  with pytest.raises(ValueError, match=r"lm.param_dtype.*float32 or bfloat16[\s\S]*"
                     r"lm.model_parallel.*>= 1 or -1"):
    validate.check_config(conftest.tiny("harvest", **{"lm.param_dtype": "float16",
                                                      "lm.model_parallel": 0}))


def test_evaluation_on_the_mesh_splits_the_sae_and_matches_one_device(checkpoint):
  # evaluate_many on the sharded LM places each SAE with its features split over "model" (as in
  # training; a 1M-wide SAE is not copied onto every device) and scores what one device does.
  from jumprelu import spliced
  path, cfg, tokens_BxL, _, _ = checkpoint
  if cfg.family != "gemma2":
    pytest.skip("the Gemma 2 checkpoint covers this path; one compile fewer")
  c = conftest.tiny("harvest", **{"lm.model_path": path, "lm.model_parallel": 2,
                                  "lm.site": "resid_post.1"})
  sharded = lm_act.load_lm(c)
  one = load.load_hf(path)
  rng = np.random.default_rng(0)
  d, width = cfg.d_model, 32
  jump = {"W_enc": rng.standard_normal((d, width)).astype(np.float32),
          "b_enc": np.zeros(width, np.float32),
          "W_dec": 0.1 * rng.standard_normal((width, d)).astype(np.float32),
          "b_dec": np.zeros(d, np.float32), "threshold": np.full(width, 0.5, np.float32)}
  topk = {**{k: jump[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec")},
          "architecture": np.asarray("topk"), "k": np.asarray(4, np.int32)}
  placed = spliced._place(sharded[0], jump)
  assert placed["W_enc"].sharding.spec == P(None, "model")
  assert {s.data.shape for s in placed["W_dec"].addressable_shards} == {(width // 2, d)}
  got = spliced.evaluate_many(c, sharded, [jump, topk], tokens_BxL, batch=8)
  want = spliced.evaluate_many(c, one, [jump, topk], tokens_BxL, batch=8)
  for g, w in zip(got, want):
    assert 0 < w["l0"] < width and abs(w["delta_lm_loss"]) > 1e-3  # a real splice
    for key in ("ce_clean", "ce_sae", "ce_zero_ablation", "l0", "fvu", "kl_clean_sae"):
      assert g[key] == pytest.approx(w[key], rel=1e-4, abs=1e-5), key
