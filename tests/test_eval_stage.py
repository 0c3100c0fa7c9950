"""Evaluation as a stage of the job: its inputs checked before any harvest, re-evaluation of a
finished run, npy stores that name their LM, the end-of-run report, optional packages."""
import importlib.util
import json
import os
import sys

import numpy as np
import pytest
from absl import flags

from configs import base
from jumprelu import cli, evaluate, files, run, spliced, train, validate
from jumprelu import workdir as workdir_lib
from jumprelu.lm import activations as lm_act
from tests.conftest import tiny
from tests.tiny_lm import tiny_lm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  """lm.model_path of the tiny LM: a folder whose config.json names its Hugging Face id (the
  folder name is what the tiny LM's harvests record as their model)."""
  path = tmp_path_factory.mktemp("lm") / "tiny-random"
  path.mkdir()
  (path / "config.json").write_text(json.dumps({"_name_or_path": "test-org/tiny-random"}))
  return str(path)


@pytest.fixture(autouse=True)
def tiny_lm_everywhere(monkeypatch):
  lm = tiny_lm()
  monkeypatch.setattr(lm_act, "load_lm", lambda c: lm)


def config(model_dir, **overrides):
  base = {"data.source": "harvest", "data.d_in": 16, "lm.site": "resid_post.1",
          "lm.model_path": model_dir, "lm.context_len": 16, "lm.batch_contexts": 4,
          "harvest.num_tokens": 600, "harvest.shard_tokens": 512, "data.norm_rows": 256,
          "eval.num_contexts": 2, "eval.skip_contexts": 60, "log.tensorboard": False}
  return tiny(**{**base, **overrides})


def test_eval_settings_are_checked_with_true_counts_before_the_harvest(tmp_path, model_dir):
  # The tiny LM's word-level tokenizer packs the stdlib docstrings into 12,200 contexts of 16.
  c = config(model_dir, **{"eval.skip_contexts": 12190, "eval.num_contexts": 32})
  held, kept = evaluate._scan_text(c, *tiny_lm()[1:3])
  reads = evaluate._harvest_contexts(c, kept)
  with pytest.raises(ValueError) as e:
    run.train_and_evaluate(c, str(tmp_path))
  assert str(e.value) == (
      f"text.source 'stdlib' yields {len(kept)} contexts of 16 tokens, but eval needs contexts "
      "12190..12221 (eval.skip_contexts=12190, eval.num_contexts=32); lower eval.skip_contexts "
      f"to at most {len(kept) - 32} and make sure it stays past the {reads} contexts the "
      "harvest (harvest.num_tokens=600) reads")
  assert len(kept) == 12200 and not os.path.exists(tmp_path / "activations")

  # Overlap: below the bound no context can beat (15 kept tokens each), without reading the
  # text; then below the exact count, which is what the harvest then reads.
  with pytest.raises(ValueError, match=r"eval.skip_contexts=10 overlaps the contexts the harvest "
                     r"\(harvest.num_tokens=600\) reads \(at least 40\); set it to at least 40"):
    run.train_and_evaluate(config(model_dir, **{"eval.skip_contexts": 10}), str(tmp_path))
  c = config(model_dir, **{"eval.skip_contexts": reads - 1})
  with pytest.raises(ValueError, match=f"eval.skip_contexts={reads - 1} overlaps the {reads} "
                     f"contexts the harvest \\(harvest.num_tokens=600\\) reads; set it to at "
                     f"least {reads}"):
    run.train_and_evaluate(c, str(tmp_path))
  assert not os.path.exists(tmp_path / "activations")
  c.eval.skip_contexts = reads
  assert evaluate.check_inputs(c, str(tmp_path))
  from jumprelu import harvest
  harvest.harvest(c, workdir_lib.store_path(c, str(tmp_path)), tiny_lm())
  assert workdir_lib.contexts_used(c, str(tmp_path)) == reads


@pytest.fixture(scope="module")
def finished(tmp_path_factory, model_dir):
  """A finished tiny harvest job: (config, workdir, summary)."""
  workdir = str(tmp_path_factory.mktemp("run"))
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(lm_act, "load_lm", lambda c: tiny_lm())
    c = config(model_dir)
    return c, workdir, run.train_and_evaluate(c, workdir)


def _lines(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as fh:
    return [json.loads(line) for line in fh if line.strip()]


def test_finished_run_rerun_with_other_eval_keys_is_evaluated_again_not_retrained(
    finished, monkeypatch):
  c, workdir, summary = finished
  first = json.load(open(os.path.join(workdir, "eval.json")))
  evals = [r for r in _lines(workdir) if "eval/delta_lm_loss" in r]  # logs.write_eval's record
  assert [r["step"] for r in evals] == [c.train.num_steps]
  assert evals[0]["eval/delta_lm_loss"] == first["delta_lm_loss"]
  assert "eval/firing_frequency" not in evals[0] and "eval/arch" not in evals[0]
  trained = [r for r in _lines(workdir) if "loss" in r]
  traces = []
  real_step = train.train_step
  monkeypatch.setattr(train, "train_step", lambda *a, **kw: traces.append(1) or real_step(*a, **kw))

  again = config(c.lm.model_path, **{"eval.num_contexts": 5, "eval.skip_contexts": 70})
  summary = run.train_and_evaluate(again, workdir)
  result = json.load(open(os.path.join(workdir, "eval.json")))
  assert not traces  # no train step ran (nor was traced)
  assert [r for r in _lines(workdir) if "loss" in r] == trained
  assert result["tokens"] > first["tokens"] and summary["eval"]["tokens"] == result["tokens"]
  assert json.load(open(os.path.join(workdir, "config.json")))["eval"]["num_contexts"] == 5


def test_report_has_units_a_legend_and_the_outputs(finished):
  c, workdir, summary = finished
  text = run.report(c, workdir, summary)
  for label in ("L0, last train batch [features/token]", "FVU, eval [fraction of variance]",
                "delta LM loss, eval [nats/token]", "loss recovered, eval [%]",
                "dead [features]", "dead on eval [% of features]",
                "threshold mean [raw activation units]",
                "dead: features that did not fire in the last train.dead_window_tokens=1,000,000",
                "dead on eval: features that never fired on the eval tokens",
                "checkpoints/", "export/params.npz", "export/saelens/", "eval.json",
                "metrics.jsonl", "summary.json"):
    assert label in text, label
  assert "tensorboard/" not in text  # log.tensorboard=False: not there, so not listed
  assert len(text) < 2500 and "{" not in text
  table = spliced.table(json.load(open(os.path.join(workdir, "eval.json"))))
  assert "delta LM loss [nats/token]" in table and "loss recovered [%]" in table
  assert "delta_lm_loss" not in table


def test_export_names_the_lm_by_its_hugging_face_id(finished):
  _, workdir, _ = finished
  meta = json.load(open(os.path.join(workdir, "export", "saelens", "cfg.json")))["metadata"]
  assert meta["model_name"] == "test-org/tiny-random" and meta["model_file"] == "tiny-random"
  assert meta["dataset_path"].startswith("python-stdlib-docstrings (Python 3.")
  assert json.load(open(os.path.join(workdir, "activations", "manifest.json")))["spec"][
      "model"] == "tiny-random"  # what a resumed harvest compares: unchanged


def test_npy_store_that_names_its_lm_is_evaluated(finished, tmp_path, caplog):
  c, workdir, _ = finished
  store = os.path.join(workdir, "activations")
  c = config(c.lm.model_path, **{"data.source": "npy", "data.path": store})
  summary = run.train_and_evaluate(c, str(tmp_path / "npy"))
  result = json.load(open(tmp_path / "npy" / "eval.json"))
  assert summary["eval"]["delta_lm_loss"] == result["delta_lm_loss"] and result["tokens"] > 0
  assert json.load(open(tmp_path / "npy" / "export" / "saelens" / "cfg.json"))["metadata"][
      "model_name"] == "test-org/tiny-random"

  # Plain .npy shards name no LM: one line says why there is no evaluation.
  plain = tmp_path / "plain.npy"
  files.save_npy(str(plain), np.random.default_rng(0).normal(size=(512, 16)).astype(np.float32))
  c = config(c.lm.model_path, **{"data.source": "npy", "data.path": str(plain)})
  caplog.set_level("INFO")
  run.train_and_evaluate(c, str(tmp_path / "plain"))
  assert not os.path.exists(tmp_path / "plain" / "eval.json")
  why = [r.getMessage() for r in caplog.records if "no evaluation" in r.getMessage()]
  assert why == [f"no evaluation with the LM: data.path={str(plain)!r} has no manifest.json "
                 "naming model, site, context_len, text (a harvested store has one), so the LM "
                 "and the text it came from are unknown"]


def test_evaluate_py_overrides_keys_of_the_saved_config(finished, monkeypatch):
  """experiments/evaluate.py --workdir=DIR --config.eval.num_contexts=3: DIR/config.json with
  that key changed (and a misspelled key refused: the config is locked)."""
  c, workdir, _ = finished
  spec = importlib.util.spec_from_file_location(
      "evaluate_py", os.path.join(REPO, "experiments", "evaluate.py"))
  module = importlib.util.module_from_spec(spec)
  monkeypatch.setattr(sys, "argv", ["evaluate.py"])  # what it defines into absl's FLAGS
  monkeypatch.setattr(flags, "FLAGS", flags.FlagValues())
  spec.loader.exec_module(module)
  argv = ["evaluate.py", f"--workdir={workdir}", "--config.eval.num_contexts=3"]
  fv = flags.FlagValues()
  config_flag = cli.define_config_flag(argv, fv)
  flags.DEFINE_string("workdir", None, "", flag_values=fv)
  fv(argv)
  saved = json.load(open(os.path.join(workdir, "config.json")))
  assert config_flag.value.eval.num_contexts == 3 != saved["eval"]["num_contexts"]
  assert config_flag.value.sae.width == saved["sae"]["width"] == 64
  evaluate.evaluate_workdir(config_flag.value, workdir)
  assert 0 < json.load(open(os.path.join(workdir, "eval.json")))["tokens"] <= 3 * 15
  fv = flags.FlagValues()
  cli.define_config_flag(argv, fv)
  flags.DEFINE_string("workdir", None, "", flag_values=fv)
  with pytest.raises(flags.Error):
    fv(argv[:2] + ["--config.eval.num_contxts=3"])
  assert cli.saved_config(["evaluate.py", f"--workdir={workdir}", "--config=x.py"]) is None


def test_a_run_saved_before_a_key_existed_loads_with_its_default(tmp_path):
  """An older DIR/config.json lacks keys added since (e.g. eval.split): they take base.py's
  defaults, and every key it has keeps its saved value."""
  old = base.get_config().to_dict()
  del old["eval"]["split"], old["optim"]["grad_clip"]
  old["sae"]["width"] = 96
  with open(tmp_path / "config.json", "w") as fh:
    json.dump(old, fh)
  c = cli.saved_config(["evaluate.py", f"--workdir={tmp_path}"])
  assert c.eval.split == base.get_config().eval.split
  assert c.optim.grad_clip == base.get_config().optim.grad_clip
  assert c.sae.width == 96 and c.eval.num_contexts == old["eval"]["num_contexts"]
  # ... and train.py resumes it: a missing key at its default is no change, a changed one is.
  now = base.get_config()
  now.sae.width = 96
  workdir_lib.check_config(now, str(tmp_path))
  now.optim.grad_clip = 0.5
  with pytest.raises(ValueError, match=r"different config \(optim.grad_clip: 0.0 -> 0.5\)"):
    workdir_lib.check_config(now, str(tmp_path))


def test_missing_datasets_package_is_refused_before_any_work(tmp_path, model_dir, monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "datasets" else real(name, *a))
  monkeypatch.setattr(lm_act, "load_lm", lambda c: pytest.fail("the LM was loaded"))
  c = config(model_dir, **{"text.source": "hf", "text.path": "monology/pile-uncopyrighted"})
  with pytest.raises(ValueError, match=r"text.source must be 'stdlib' or 'files' when the "
                     r"datasets package is not installed \(pip install datasets\), got 'hf'"):
    run.train_and_evaluate(c, str(tmp_path))
  validate.check_config(config(model_dir, **{"data.source": "npy", "data.path": "x",
                                             "text.source": "hf", "text.path": "d",
                                             "eval.num_contexts": 0}))  # reads no text


def test_training_logs_the_threshold_in_raw_units(tmp_path):
  """threshold_mean means θ·C (raw units) in metrics.jsonl, as in eval.json and the exports."""
  c = tiny(**{"train.log_every": 1, "train.num_steps": 2, "log.tensorboard": False})
  summary = run.train_and_evaluate(c, str(tmp_path))
  first = _lines(str(tmp_path))[0]  # the step-1 metrics, of the initial θ
  assert first["step"] == 1 and summary["norm_scale"] > 1.1
  assert first["threshold_mean"] == pytest.approx(c.sae.threshold_init * summary["norm_scale"],
                                                  rel=1e-5)


def test_eval_split_holds_out_another_split_of_the_dataset(tmp_path, model_dir):
  """eval.split reads the held-out contexts from that split's start: no skipping past what
  training reads (a pod run would otherwise tokenise its whole training text first)."""
  words = open(os.path.join(REPO, "README.md")).read().split()
  dataset = tmp_path / "ds"
  dataset.mkdir()
  for split, lo in (("train", 0), ("validation", 5000)):
    files.save_jsonl(str(dataset / f"{split}.jsonl"),
                     [{"text": " ".join(words[lo + 40 * i:lo + 40 * (i + 1)])} for i in range(60)])
  c = config(model_dir, **{"text.source": "hf", "text.path": str(dataset),
                           "eval.split": "validation", "eval.skip_contexts": 0,
                           "eval.num_contexts": 3})
  _, cfg, tokenizer, _ = tiny_lm()
  assert evaluate.check_inputs(c, str(tmp_path / "run"))  # skip 0 is no overlap here
  held = evaluate.held_out_contexts(c, cfg, tokenizer, harvested_contexts=50)
  docs = [json.loads(line)["text"] for line in open(dataset / "validation.jsonl")]
  want = list(lm_act.text.pack(iter(docs), tokenizer, 16, cfg.bos_id, cfg.eos_id))[:3]
  np.testing.assert_array_equal(held, np.stack(want))
  with pytest.raises(ValueError, match="eval.split must be '' unless text.source='hf'"):
    validate.check_config(config(model_dir, **{"eval.split": "validation"}))
