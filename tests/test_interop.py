"""SAELens and Gemma Scope formats: files as documented, round trips, folders SAELens wrote."""
import json
import os
import platform

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jumprelu import data, export, files, run, sae
from jumprelu.lm import load
from tests.conftest import tiny

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "saelens_jumprelu")
META = dict(model_name="SmolLM2-135M", hook_name="blocks.12.hook_resid_post", context_size=1024,
            dataset_path="HuggingFaceFW/fineweb-edu")


def _trained_like_params(d=16, f=64, seed=0):
  """Training-form params (log θ, normalised units) with non-trivial biases and thresholds."""
  k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
  p = sae.init(k1, d, f)
  p["b_enc"] = 0.05 * jax.random.normal(k2, (f,))
  p["b_dec"] = 0.1 * jax.random.normal(k3, (d,))
  p["log_threshold"] = jax.random.uniform(k4, (f,), minval=np.log(0.05), maxval=np.log(0.3))
  return p


def _synthetic_x(n=512, d=16):
  return data.synthetic(n, d, 32, 3.0, seed=7)[0]


def test_saelens_round_trip_reproduces_encode_decode(tmp_path):
  """Export (fold C, write SAELens) then import: encode/decode of raw x agree to 1e-6."""
  p, scale, x = _trained_like_params(), 3.7, _synthetic_x()
  raw = export.raw_params("jumprelu", p, scale)
  export.save_saelens(str(tmp_path), raw, **META)
  loaded, cfg = export.load_saelens(str(tmp_path))
  assert cfg["metadata"]["hook_name"] == META["hook_name"]

  f_ref, _ = sae.encode(p, x / scale, bandwidth=0.001)  # the model as trained, in its own units
  f_raw, _ = sae.encode(loaded, x, bandwidth=0.001)
  assert 0 < np.mean(np.asarray(f_raw) > 0) < 0.5  # some features fire, not all
  np.testing.assert_array_equal(np.asarray(f_raw) > 0, np.asarray(f_ref) > 0)
  np.testing.assert_allclose(f_raw, scale * np.asarray(f_ref), rtol=1e-6, atol=1e-6 * scale)
  np.testing.assert_allclose(sae.decode(loaded, f_raw), scale * np.asarray(sae.decode(p, f_ref)),
                             rtol=1e-6, atol=1e-6 * scale)
  for k in export.GEMMA_SCOPE_KEYS:  # and the arrays themselves survive bit for bit
    np.testing.assert_array_equal(loaded[k], raw[k])


def test_saelens_files_match_the_documented_keys_shapes_and_dtypes(tmp_path):
  d, f = 16, 64
  raw = export.raw_params("jumprelu", _trained_like_params(d, f), 2.0)
  density_F = np.linspace(0.0, 0.3, f)
  export.save_saelens(str(tmp_path), raw, density_F=density_F, **META)
  assert sorted(os.listdir(tmp_path)) == ["cfg.json", "sae_weights.safetensors",
                                          "sparsity.safetensors"]
  cfg = json.load(open(tmp_path / "cfg.json"))
  assert cfg["architecture"] == "jumprelu"
  assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"]) == (d, f, "float32")
  assert cfg["apply_b_dec_to_input"] is False and cfg["normalize_activations"] == "none"
  meta = cfg["metadata"]
  assert int(meta["sae_lens_version"].split(".")[0]) >= 6
  assert {k: meta[k] for k in META} == META

  weights = load_file(str(tmp_path / "sae_weights.safetensors"))
  shapes = {"W_enc": (d, f), "W_dec": (f, d), "b_enc": (f,), "b_dec": (d,), "threshold": (f,)}
  assert {k: v.shape for k, v in weights.items()} == shapes
  assert all(v.dtype == np.float32 for v in weights.values())
  sparsity = load_file(str(tmp_path / "sparsity.safetensors"))
  assert list(sparsity) == ["sparsity"] and sparsity["sparsity"].dtype == np.float32
  np.testing.assert_allclose(sparsity["sparsity"], np.log10(density_F + 1e-10), rtol=1e-6)
  assert sparsity["sparsity"][0] == pytest.approx(-10.0)  # never fired: log10(1e-10)
  np.testing.assert_allclose(export.load_saelens_density(str(tmp_path)), density_F, atol=1e-7)


def test_loads_a_folder_that_saelens_wrote():
  """tests/data/saelens_jumprelu was written by SAELens 6 (make.py there), with SAELens's
  default apply_b_dec_to_input=True; our encode/decode must match SAELens's own outputs."""
  params, cfg = export.load_saelens(FIXTURE)
  io = np.load(os.path.join(FIXTURE, "io.npz"))
  assert cfg["apply_b_dec_to_input"] is True
  f, _ = sae.encode(params, io["x"], bandwidth=0.001)
  np.testing.assert_array_equal(np.asarray(f) > 0, io["f"] > 0)
  np.testing.assert_allclose(f, io["f"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(sae.decode(params, f), io["x_hat"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(export.load_saelens_density(FIXTURE), np.linspace(0, 0.5, 32),
                             atol=1e-6)
  np.testing.assert_array_equal(export.load(FIXTURE)["b_enc"], params["b_enc"])


def test_gemma_scope_params_npz_loads_in_both_spellings(tmp_path):
  raw = export.raw_params("jumprelu", _trained_like_params(), 1.5)
  files.save_npz(str(tmp_path / "a" / "params.npz"), raw)
  os.makedirs(tmp_path / "b")
  np.savez(tmp_path / "b" / "params.npz", **{k.replace("W_", "w_"): v for k, v in raw.items()})
  for path in (tmp_path / "a" / "params.npz", tmp_path / "a", tmp_path / "b" / "params.npz"):
    loaded = export.load(str(path))
    for k in export.GEMMA_SCOPE_KEYS:
      np.testing.assert_array_equal(loaded[k], raw[k])
  x = _synthetic_x()
  np.testing.assert_array_equal(sae.encode(loaded, x, bandwidth=0.001)[0],
                                sae.encode(raw, x, bandwidth=0.001)[0])


def test_refusals_say_what_to_do(tmp_path):
  raw = export.raw_params("jumprelu", _trained_like_params(), 1.0)
  with pytest.raises(KeyError, match=r"export.raw_params"):
    export.save_saelens(str(tmp_path / "x"), {"W_enc": raw["W_enc"]}, **META)
  export.save_saelens(str(tmp_path / "s"), raw, **META)
  cfg = json.load(open(tmp_path / "s" / "cfg.json"))
  for change, message in (({"architecture": "batchtopk"}, "architecture 'batchtopk'"),
                          ({"architecture": "topk"}, "a topk SAE must give k, an int; got None"),
                          ({"normalize_activations": "layer_norm"}, "fold the scale in")):
    with open(tmp_path / "s" / "cfg.json", "w") as fh:
      json.dump({**cfg, **change}, fh)
    with pytest.raises(ValueError, match=message):
      export.load_saelens(str(tmp_path / "s"))
  with pytest.raises(FileNotFoundError, match="neither cfg.json"):
    export.load(str(tmp_path))
  bad = {k: v for k, v in raw.items() if k != "threshold"}
  save_file(bad, str(tmp_path / "s" / "sae_weights.safetensors"))
  with open(tmp_path / "s" / "cfg.json", "w") as fh:
    json.dump(cfg, fh)
  with pytest.raises(KeyError, match="lacks \\['threshold'\\]"):
    export.load_saelens(str(tmp_path / "s"))


def test_training_writes_the_saelens_folder_with_firing_densities(tmp_path):
  c = tiny(**{"export.model_name": "synthetic", "export.hook_name": "blocks.0.hook_resid_post",
              "export.density_batches": 3})
  run.train_and_evaluate(c, str(tmp_path))
  out = tmp_path / "export" / "saelens"
  params, cfg = export.load_saelens(str(out))
  npz = export.load_gemma_scope(str(tmp_path / "export" / "params.npz"))
  for k in export.GEMMA_SCOPE_KEYS:
    np.testing.assert_array_equal(params[k], npz[k])
  assert cfg["metadata"]["model_name"] == "synthetic"
  assert cfg["metadata"]["normalization_scale"] > 1.0
  # The densities were measured on the 3 batches that follow the last training step.
  source = run.make_source(c)[0]
  x = np.concatenate([source.batch(c.train.num_steps + k, c.train.batch_size) for k in range(3)])
  f, _ = sae.encode(params, x, bandwidth=c.sae.bandwidth)
  np.testing.assert_allclose(export.load_saelens_density(str(out)),
                             np.mean(np.asarray(f) > 0, axis=0), atol=1e-6)


def test_run_metadata_comes_from_the_config_or_else_the_lm_and_the_harvested_store(tmp_path):
  raw = export.raw_params("jumprelu", _trained_like_params(), 1.0)
  manifest = {"spec": {"model": "SmolLM2-135M-Instruct.Q4_1.gguf", "context_len": 128,
                       "hook_name": "blocks.14.hook_resid_post", "text": "stdlib:"}}
  lm_info = {"model_name": "HuggingFaceTB/SmolLM2-135M-Instruct", "model_quantization": "Q4_1",
             "model_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
  c = tiny(**{"data.source": "harvest"})
  export.save_saelens_for_run(c, str(tmp_path / "a"), raw, None, 2.0, manifest, lm_info)
  meta = json.load(open(tmp_path / "a" / "cfg.json"))["metadata"]
  assert (meta["model_name"], meta["hook_name"], meta["context_size"], meta["dataset_path"]) == (
      "HuggingFaceTB/SmolLM2-135M-Instruct", "blocks.14.hook_resid_post", 128,
      f"python-stdlib-docstrings (Python {platform.python_version()})")
  assert (meta["model_quantization"], meta["model_file"]) == ("Q4_1", lm_info["model_file"])
  assert meta["normalization_scale"] == 2.0
  # An npy store harvested elsewhere: its manifest's model file, no Python version known.
  export.save_saelens_for_run(tiny(**{"data.path": "/store"}), str(tmp_path / "n"), raw, None,
                              2.0, manifest)
  meta = json.load(open(tmp_path / "n" / "cfg.json"))["metadata"]
  assert (meta["model_name"], meta["dataset_path"], meta["model_quantization"]) == (
      "SmolLM2-135M-Instruct.Q4_1.gguf", "python-stdlib-docstrings", None)
  for source, path in (("hf", "monology/pile-uncopyrighted"), ("files", "/data/**/*.jsonl")):
    c = tiny(**{"data.source": "live", "text.source": source, "text.path": path})
    export.save_saelens_for_run(c, str(tmp_path / source), raw, None, 2.0, None, lm_info)
    assert json.load(open(tmp_path / source / "cfg.json"))["metadata"]["dataset_path"] == path
  c = tiny(**{"export.model_name": "google/gemma-2-9b",
              "export.hook_name": "blocks.20.hook_resid_post", "export.context_size": 1024,
              "export.dataset_path": "monology/pile-uncopyrighted"})
  export.save_saelens_for_run(c, str(tmp_path / "b"), raw, None, 2.0, manifest)
  meta = json.load(open(tmp_path / "b" / "cfg.json"))["metadata"]
  assert (meta["model_name"], meta["hook_name"], meta["context_size"], meta["dataset_path"]) == (
      "google/gemma-2-9b", "blocks.20.hook_resid_post", 1024, "monology/pile-uncopyrighted")
  assert not os.path.exists(tmp_path / "b" / "sparsity.safetensors")  # no densities given


def _gguf(path, **fields):
  """A GGUF file holding only the given general.* metadata (no tensors)."""
  import gguf
  w = gguf.GGUFWriter(str(path), "llama")
  for key, value in fields.items():
    (w.add_uint32 if isinstance(value, int) else w.add_string)(f"general.{key}", value)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return str(path)


def test_model_id_is_the_hugging_face_repository_the_model_came_from(tmp_path):
  # As in the embedded SmolLM2 file: an organisation and a llama.cpp file name, no source URL.
  path = _gguf(tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf", organization="HuggingFaceTB",
               name="Smollm2 135M 8k Lc100K Mix1 Ep2", file_type=3)
  assert load.model_info(path) == {"model_name": "HuggingFaceTB/SmolLM2-135M-Instruct",
                                    "model_quantization": "Q4_1",
                                    "model_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
  path = _gguf(tmp_path / "model-q8_0.gguf", organization="Other", file_type=7,
               **{"source.url": "https://huggingface.co/org/Real-Model"})
  assert load.model_info(path)["model_name"] == "org/Real-Model"
  assert load.model_info(path)["model_quantization"] == "Q8_0"
  for name_or_path, expected in (("google/gemma-2-9b", "google/gemma-2-9b"), (None, "ckpt")):
    folder = tmp_path / str(name_or_path is None) / "ckpt"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"_name_or_path": name_or_path}))
    assert load.model_info(str(folder)) == {"model_name": expected, "model_quantization": None,
                                            "model_file": "ckpt"}
