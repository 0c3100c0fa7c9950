"""experiments/harvest.py as two processes of 4 CPU devices each (jax.distributed over loopback):
the store they write is the one-process store, also after a kill -9 of either process and a
rerun of the same command."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import tokenizers
from safetensors.numpy import save_file

from tests.conftest import free_port, process_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = [f"w{i}" for i in range(60)]
# Runs experiments/harvest.py; with JUMPRELU_TEST_KILL_AT=N the process kill -9s itself when it
# is about to write its N-th commit record: a part after a shard (the shard written, not yet
# recorded: the narrowest window) or, on process 0, manifest.json at the end.
ENTRY = """
import os, runpy, signal, sys
sys.path.insert(0, {repo!r})
from jumprelu import harvest
kill_at = int(os.environ.get("JUMPRELU_TEST_KILL_AT", "0"))
calls = [0]
def dying(real):
  def write(*args):
    calls[0] += 1
    if calls[0] == kill_at:
      os.kill(os.getpid(), signal.SIGKILL)
    real(*args)
  return write
harvest._write_part = dying(harvest._write_part)
harvest._write_manifest = dying(harvest._write_manifest)
sys.argv = ["harvest.py"] + sys.argv[1:]
runpy.run_path({harvest_py!r}, run_name="__main__")
"""


def _tiny_checkpoint(directory) -> None:
  """A random 2-layer Llama in Hugging Face form (config.json, safetensors, tokenizer.json)."""
  os.makedirs(directory)
  vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  tok.save(os.path.join(directory, "tokenizer.json"))
  v, d, f, n_layers = len(vocab), 16, 32, 2
  config = {"model_type": "llama", "vocab_size": v, "hidden_size": d, "intermediate_size": f,
            "num_hidden_layers": n_layers, "num_attention_heads": 2, "num_key_value_heads": 1,
            "head_dim": 8, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
            "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
            "pad_token_id": 2}
  json.dump(config, open(os.path.join(directory, "config.json"), "w"))
  rng = np.random.default_rng(0)
  shapes = {"self_attn.q_proj.weight": (16, d), "self_attn.k_proj.weight": (8, d),
            "self_attn.v_proj.weight": (8, d), "self_attn.o_proj.weight": (d, 16),
            "mlp.gate_proj.weight": (f, d), "mlp.up_proj.weight": (f, d),
            "mlp.down_proj.weight": (d, f), "input_layernorm.weight": (d,),
            "post_attention_layernorm.weight": (d,)}
  tensors = {"model.embed_tokens.weight": rng.standard_normal((v, d)),
             "model.norm.weight": np.ones(d)}
  for i in range(n_layers):
    for name, shape in shapes.items():
      tensors[f"model.layers.{i}.{name}"] = (1 + 0.1 * rng.standard_normal(shape)) if len(
          shape) == 1 else 0.3 * rng.standard_normal(shape)
  save_file({k: t.astype(np.float32) for k, t in tensors.items()},
            os.path.join(directory, "model.safetensors"))


def _text(path) -> None:
  rng = np.random.default_rng(1)
  with open(path, "w") as fh:
    for _ in range(60):
      fh.write(json.dumps({"text": " ".join(rng.choice(WORDS, rng.integers(5, 60)))}) + "\n")


def _env(kill_at=0):
  return process_env(4, JUMPRELU_TEST_KILL_AT=str(kill_at))  # conftest's compile cache is shared


def _files(path) -> dict:
  return {n: open(os.path.join(path, n), "rb").read() for n in sorted(os.listdir(path))}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
  """(a folder with the tiny LM and text, experiments/harvest.py's command, the one-process
  store's files)."""
  tmp_path = tmp_path_factory.mktemp("mp")
  _tiny_checkpoint(tmp_path / "lm")
  _text(tmp_path / "docs.jsonl")
  entry = tmp_path / "entry.py"
  entry.write_text(ENTRY.format(repo=REPO, harvest_py=os.path.join(REPO, "experiments",
                                                                   "harvest.py")))
  args = [sys.executable, str(entry), f"--config={REPO}/configs/tiny.py:harvest",
          f"--config.lm.model_path={tmp_path}/lm", "--config.text.source=files",
          f"--config.text.path={tmp_path}/docs.jsonl", "--config.harvest.num_tokens=900",
          "--config.harvest.shard_tokens=120"]

  one = subprocess.run(args + [f"--workdir={tmp_path}/one"], env=_env(),
                       capture_output=True, text=True, timeout=120)
  assert one.returncode == 0, one.stderr[-3000:]
  store = _files(tmp_path / "one" / "activations")
  manifest = json.loads(store["manifest.json"])
  assert manifest["tokens"] == 900 and len(manifest["shards"]) >= 6
  return tmp_path, args, store


def _two(tmp_path, args, workdir, victim=None, kill_at=1):
  """Both processes; the victim kill -9s itself at its kill_at-th commit record, then the
  other is killed too (as a scheduler tears the job down). Returns the processes' stderr."""
  port = free_port()
  procs = [subprocess.Popen(
      args + [f"--workdir={workdir}", "--distributed",
              f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
              f"--process_id={i}"], env=_env(kill_at if i == victim else 0),
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(2)]
  if victim is not None:
    procs[victim].wait(timeout=120)
    assert procs[victim].returncode == -signal.SIGKILL, procs[victim].stderr.read()[-3000:]
    procs[1 - victim].send_signal(signal.SIGKILL)
  outs = [p.communicate(timeout=120)[1] for p in procs]
  if victim is None:
    for p, err in zip(procs, outs):
      assert p.returncode == 0, err[-3000:]
  return outs


@pytest.mark.multiprocess
def test_two_processes_write_the_one_process_store_also_after_kill_9(one_process):
  tmp_path, args, store = one_process

  def two(victim=None, kill_at=1):
    return _two(tmp_path, args, tmp_path / "two", victim, kill_at)

  two(victim=1, kill_at=2)
  assert "manifest.p00001.json" in os.listdir(tmp_path / "two" / "activations")
  partial = json.load(open(tmp_path / "two" / "activations" / "manifest.json"))
  assert not partial["complete"] and not partial["shards"]
  two(victim=0)  # the same command again, process 0 killed this time (mid-harvest or commit)
  outs = two()  # and again: the job finishes
  assert "process 1/2, 4 local devices of 8" in outs[1]
  got = _files(tmp_path / "two" / "activations")
  assert sorted(got) == sorted(store)
  for name in store:  # byte for byte: each process's LM runs on 4 devices, as the one did
    assert got[name] == store[name], name


@pytest.mark.multiprocess
def test_global_mesh_harvest_writes_the_one_process_store_also_after_kill_9(one_process):
  """harvest.mesh=global: one LM over the 8 devices of both processes, harvesting in lockstep
  rounds (each device still forwards one context of a batch, as in the one-process run)."""
  tmp_path, args, store = one_process
  args = args + ["--config.harvest.mesh=global"]
  _two(tmp_path, args, tmp_path / "global", victim=1, kill_at=2)  # mid-harvest
  partial = json.load(open(tmp_path / "global" / "activations" / "manifest.json"))
  assert not partial["complete"] and not partial["shards"]
  outs = _two(tmp_path, args, tmp_path / "global")  # the same command again finishes the store
  assert "harvest.mesh=global: the LM on mesh {'data': 8, 'model': 1} of 8 devices" in outs[1]
  got = _files(tmp_path / "global" / "activations")
  assert sorted(got) == sorted(store)
  for name in store:
    assert got[name] == store[name], name


@pytest.mark.multiprocess
def test_global_mesh_harvest_with_layers_split_over_two_devices(one_process):
  """lm.model_parallel=2: each process's rows come back once from its 2 × 2 devices."""
  tmp_path, args, _ = one_process
  args = args + ["--config.lm.model_parallel=2"]
  one = subprocess.run(args + [f"--workdir={tmp_path}/one_mp2"], env=_env(),
                       capture_output=True, text=True, timeout=120)
  assert one.returncode == 0, one.stderr[-3000:]
  store = _files(tmp_path / "one_mp2" / "activations")
  outs = _two(tmp_path, args + ["--config.harvest.mesh=global"], tmp_path / "global_mp2")
  assert "the LM on mesh {'data': 4, 'model': 2} of 8 devices" in outs[0]
  got = _files(tmp_path / "global_mp2" / "activations")
  assert sorted(got) == sorted(store)
  for name in store:  # each device forwards the same rows with the same layer split as the one
    assert got[name] == store[name], name
