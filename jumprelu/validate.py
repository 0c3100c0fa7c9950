"""Config checks that run before any data is read or anything is compiled, and the config
described key by key (--show_config)."""
import difflib
import importlib.util
import inspect
import io
import math
import re
import tokenize

from configs import base
from jumprelu import arch, bandwidth, data, objectives, ops, sae, storage, sweep

DATA_SOURCES = ("npy", "harvest", "live", "synthetic")
STEP_IMPLS = ("dense", "sparse", "auto")  # auto: sparse.choose_step_impl, per platform
TEXT_SOURCES = ("stdlib", "files", "hf")


def check_config(c) -> None:
  """Raises one ValueError listing every bad key, with the expected and the actual value."""
  check_keys(c)
  problems = []

  def need(ok, key, expected):
    value = c
    for part in key.split("."):
      value = value[part]
    if isinstance(value, float) and not math.isfinite(value):  # inf passes "> 0"
      ok, expected = False, f"finite and {expected}"
    if not ok:
      problems.append(f"{key} must be {expected}, got {value!r}")

  need(0 <= c.seed < 2**32, "seed", "in [0, 2**32)")

  need(c.data.source in DATA_SOURCES, "data.source", f"one of {DATA_SOURCES}")
  need(c.data.source != "npy" or bool(c.data.path), "data.path",
       "a .npy file or a directory of .npy shards when data.source='npy'")
  need(c.data.d_in > 0, "data.d_in", "the activation width D (> 0)")
  need(c.data.norm_rows > 0, "data.norm_rows", "> 0")
  need(c.data.sampler in data.SAMPLERS, "data.sampler", f"one of {data.SAMPLERS}")
  need(c.data.block_rows >= 1, "data.block_rows", ">= 1")
  need(c.data.buffer_blocks >= 1, "data.buffer_blocks", ">= 1")
  remote = c.data.source in ("npy", "harvest") and storage.is_remote(c.data.path)
  need(c.data.sampler != "rows" or not remote, "data.sampler",
       "'blocks' or 'auto' for a remote data.path (the rows sampler reads single rows)")
  if c.data.source != "live" and (c.data.sampler == "blocks" or (c.data.sampler == "auto" and
                                                                 remote)):
    need(c.data.buffer_blocks >= 1 and c.train.batch_size % c.data.buffer_blocks == 0,
         "data.buffer_blocks", f"a divisor of train.batch_size={c.train.batch_size} (the block "
         "sampler draws batch_size / buffer_blocks rows of every batch from each block)")
  need(c.sae.arch in arch.ARCHS, "sae.arch", f"one of {arch.ARCHS}")
  need(c.sae.width > 0, "sae.width", "> 0")
  need(c.sae.sparsity_coefficient >= 0, "sae.sparsity_coefficient", ">= 0")
  need(c.sae.bandwidth > 0, "sae.bandwidth", "> 0")
  # TopK's keys are range-checked always; against the width only when TopK trains (also a
  # JumpReLU's TopK start, and its AuxK on dead latents, which takes k_aux of them).
  topk = c.sae.arch in ("topk", "batchtopk") or (
      c.sae.arch == "jumprelu" and bool(c.sae.topk_start_steps or c.sae.jumprelu_auxk))
  top = c.sae.width if topk else math.inf
  for key in ("k", "k_aux"):
    need(isinstance(c.sae[key], int) and 1 <= c.sae[key] <= top, f"sae.{key}",
         f"an int in [1, sae.width={c.sae.width}]" if topk else "an int >= 1")
  need(c.sae.aux_coefficient >= 0, "sae.aux_coefficient", ">= 0")
  for key, ok, expected in (
      ("sparsity_coefficient", lambda v: v >= 0, "values >= 0"),
      ("bandwidth", lambda v: v > 0, "values > 0"),
      ("k", lambda v: isinstance(v, int) and 1 <= v <= c.sae.width,
       f"ints in [1, sae.width={c.sae.width}]"),
      ("target_l0", lambda v: v > 0, "values > 0")):
    values = c.sweep[key]
    need(isinstance(values, tuple | list) and all(
        isinstance(v, int | float) and math.isfinite(v) and ok(v) for v in values)
         and len(set(values)) == len(values), f"sweep.{key}",
         f"a tuple of distinct {expected} (empty: no sweep over it)")
  swept = [k for k in sweep.AXES if c.sweep[k]]
  for key in swept:
    need(key in arch.USES.get(c.sae.arch, sweep.AXES), f"sweep.{key}",
         f"empty: sae.arch={c.sae.arch!r} does not use it")
  need(not swept or c.train.step_impl != "sparse" or c.sae.arch != "jumprelu", "train.step_impl",
       "'dense' in a sweep (the sparse step's capacity fallback does not vmap efficiently)")
  need(c.train.step_impl != "sparse" or c.sae.arch == "jumprelu", "train.step_impl",
       "'dense' unless sae.arch='jumprelu' (the sparse step is JumpReLU's)")
  _check_objectives(c, need)
  need(c.sae.kernel in ops.KERNELS, "sae.kernel", f"one of {ops.KERNELS}")
  need(c.sae.threshold_init > 0, "sae.threshold_init", "> 0")
  need(c.sae.threshold_param in sae.THRESHOLD_PARAMS, "sae.threshold_param",
       f"one of {sae.THRESHOLD_PARAMS}")
  need(c.sae.decoder_norm in ("unit", "free"), "sae.decoder_norm", "'unit' or 'free'")
  need(c.sae.pre_relu or (objectives.uses_paper_loss(c) and c.train.step_impl != "sparse"),
       "sae.pre_relu", "True unless the paper's L0 loss trains with the dense step "
       "(train.step_impl 'dense' or 'auto')")
  need(c.sae.bandwidth_rule in bandwidth.RULES, "sae.bandwidth_rule", f"one of {bandwidth.RULES}")
  if c.sae.bandwidth_rule == "adaptive":
    need(c.train.step_impl != "sparse", "train.step_impl", "'dense' or 'auto' with "
         "sae.bandwidth_rule='adaptive' (the sparse step keeps no [B, F] pre-activations for its "
         "statistics)")
  need(c.sae.bandwidth_scale > 0, "sae.bandwidth_scale", "> 0")
  need(c.sae.bandwidth_window > 0, "sae.bandwidth_window", "> 0")
  need(0 <= c.sae.bandwidth_decay < 1, "sae.bandwidth_decay", "in [0, 1)")
  need(c.sae.bandwidth_min_count >= 0, "sae.bandwidth_min_count", ">= 0")
  need(c.optim.grad_clip >= 0, "optim.grad_clip", ">= 0 (0: off)")
  need(c.optim.threshold_lr_scale > 0, "optim.threshold_lr_scale", "> 0")
  need(c.optim.learning_rate > 0, "optim.learning_rate", "> 0")
  need(0 <= c.optim.b1 < 1, "optim.b1", "in [0, 1)")
  need(0 <= c.optim.b2 < 1, "optim.b2", "in [0, 1)")
  need(c.optim.eps > 0, "optim.eps", "> 0")
  need(c.optim.lr_warmup_steps >= 0, "optim.lr_warmup_steps", ">= 0")
  need(0 < c.optim.lr_warmup_init <= 1, "optim.lr_warmup_init", "in (0, 1]")
  need(c.optim.sparsity_warmup_steps >= 0, "optim.sparsity_warmup_steps", ">= 0")
  need(c.train.batch_size > 0, "train.batch_size", "> 0")
  need(0 < c.train.num_steps < 2**31, "train.num_steps", "in [1, 2**31) (the step is int32)")
  need(c.train.log_every > 0, "train.log_every", "> 0")
  need(c.train.checkpoint_every > 0, "train.checkpoint_every", "> 0")
  need(c.train.keep_checkpoints >= 1, "train.keep_checkpoints", ">= 1")
  need(0 < c.train.dead_window_tokens <= 2**30, "train.dead_window_tokens",
       "in [1, 2**30] (the per-feature counters stop at 2**30)")
  need(c.train.step_impl in STEP_IMPLS, "train.step_impl", f"one of {STEP_IMPLS}")
  need(0 < c.train.sparse_capacity <= 1, "train.sparse_capacity",
       "in (0, 1] (a fraction of the batch × width entries)")
  need(c.train.matmul_dtype in sae.MATMUL_DTYPES, "train.matmul_dtype",
       f"one of {sae.MATMUL_DTYPES}")
  need(c.train.prefetch >= 0, "train.prefetch", ">= 0 (0: no prefetch thread)")
  need(c.log.histogram_every >= 0, "log.histogram_every", ">= 0 (0: never)")
  need(not c.log.wandb_project or importlib.util.find_spec("wandb") is not None,
       "log.wandb_project", "'' (off) when wandb is not installed (pip install wandb)")
  need(c.export.context_size >= 0, "export.context_size", ">= 0")
  need(c.export.density_batches >= 1, "export.density_batches", ">= 1")
  need(c.mesh.data == -1 or c.mesh.data >= 1, "mesh.data", ">= 1 or -1 (all devices left)")
  need(c.mesh.model == -1 or c.mesh.model >= 1, "mesh.model", ">= 1 or -1 (all devices)")
  if c.data.source == "live":
    need(c.data.live_chunk_contexts >= 1, "data.live_chunk_contexts", ">= 1")
    need(c.data.live_chunk_steps >= 1, "data.live_chunk_steps", ">= 1")
  if c.data.source in ("harvest", "live"):
    need(c.lm.model_path is not None, "lm.model_path",
         "a local checkpoint directory or .gguf file (this config has no default model)")
    need(bool(re.fullmatch(r"(resid_post|mlp_out|attn_out)\.\d+", c.lm.site)), "lm.site",
         "'resid_post.L', 'mlp_out.L' or 'attn_out.L'")
    need(c.lm.context_len >= 2, "lm.context_len", ">= 2")
    need(0 <= c.lm.skip_positions < c.lm.context_len - 1, "lm.skip_positions",
         "in [0, lm.context_len - 1)")
    need(c.lm.batch_contexts >= 1, "lm.batch_contexts", ">= 1")
    need(c.lm.bos_id >= -1, "lm.bos_id", "a token id >= 0, or -1 (the checkpoint's BOS)")
    need(c.lm.eos_id >= -1, "lm.eos_id", "a token id >= 0, or -1 (the checkpoint's EOS)")
    need(c.lm.dtype in ("float32", "bfloat16"), "lm.dtype", "float32 or bfloat16")
    need(c.lm.param_dtype in ("float32", "bfloat16"), "lm.param_dtype", "float32 or bfloat16")
    need(c.lm.model_parallel == -1 or c.lm.model_parallel >= 1, "lm.model_parallel",
         ">= 1 or -1 (every device of a process)")
    need(c.text.source in TEXT_SOURCES, "text.source", f"one of {TEXT_SOURCES}")
    need(c.text.source == "stdlib" or bool(c.text.path), "text.path",
         "a glob (text.source='files') or a dataset name (text.source='hf')")
    need(c.harvest.num_tokens > 0, "harvest.num_tokens", "> 0")
    need(c.harvest.shard_tokens > 0, "harvest.shard_tokens", "> 0")
    need(c.harvest.dtype in ("float32", "bfloat16"), "harvest.dtype", "float32 or bfloat16")
    need(c.harvest.mesh in ("auto", "local", "global"), "harvest.mesh",
         "'auto', 'local' (each process its own LM) or 'global' (one LM over every device)")
  # An npy store's manifest may name its LM, which then evaluates the SAE (evaluate.skip_reason).
  need(c.eval.num_contexts >= 0, "eval.num_contexts", ">= 0 (0: no evaluation with the LM)")
  need(c.eval.skip_contexts >= 0, "eval.skip_contexts", ">= 0")
  need(c.eval.batch_contexts >= 1, "eval.batch_contexts", ">= 1")
  need(not c.eval.split or c.text.source == "hf", "eval.split",
       f"'' unless text.source='hf' (it names a split of that dataset; text.source is "
       f"{c.text.source!r})")
  reads_text = c.data.source in ("harvest", "live") or (
      c.data.source == "npy" and c.eval.num_contexts > 0)
  need(not reads_text or c.text.source != "hf" or importlib.util.find_spec("datasets")
       is not None, "text.source", "'stdlib' or 'files' when the datasets package is not "
       "installed (pip install datasets)")
  if c.data.source == "synthetic":
    s = c.data.synthetic
    need(s.n_rows > 0, "data.synthetic.n_rows", "> 0")
    need(s.n_features > 0, "data.synthetic.n_features", "> 0")
    need(0 < s.mean_l0 <= s.n_features / 2, "data.synthetic.mean_l0",
         "in (0, n_features / 2]")
    need(s.noise_std >= 0, "data.synthetic.noise_std", ">= 0")
    need(s.freq_exponent >= 0, "data.synthetic.freq_exponent", ">= 0 (0: equal firing rates)")
    need(s.magnitude_sigma >= 0, "data.synthetic.magnitude_sigma", ">= 0")
    need(s.seed >= 0, "data.synthetic.seed", ">= 0")
  if problems:
    raise ValueError("invalid config:\n  " + "\n  ".join(problems))


def _check_objectives(c, need) -> None:
  """The sparsity objectives (objectives.py), BatchTopK's threshold and the Matryoshka prefixes."""
  s = c.sae
  need(0 <= s.batchtopk_threshold_decay < 1, "sae.batchtopk_threshold_decay", "in [0, 1)")
  need(s.sparsity_loss in objectives.SPARSITY_LOSSES, "sae.sparsity_loss",
       f"one of {objectives.SPARSITY_LOSSES}")
  need(s.target_l0 > 0, "sae.target_l0", "> 0 (features per token)")
  need(s.tanh_scale > 0, "sae.tanh_scale", "> 0")
  need(s.pre_act_coefficient >= 0, "sae.pre_act_coefficient", ">= 0 (0: off)")
  need(s.frequency_coefficient >= 0, "sae.frequency_coefficient", ">= 0 (0: off)")
  need(s.jumprelu_auxk >= 0, "sae.jumprelu_auxk", ">= 0 (0: off)")
  need(0 < s.frequency_max < 1, "sae.frequency_max", "in (0, 1) (a fraction of tokens)")
  need(0 <= s.topk_start_steps < max(c.train.num_steps, 1), "sae.topk_start_steps",
       f"in [0, train.num_steps={c.train.num_steps}) (0: off; the SAE must train as a JumpReLU "
       "after it)")
  # Another architecture would ignore JumpReLU's objectives in silence.
  other = f"when sae.arch={s.arch!r} (they are JumpReLU's objectives)"
  if s.arch != "jumprelu":
    need(s.sparsity_loss == "l0", "sae.sparsity_loss", f"'l0' {other}")
    need(s.pre_act_coefficient == 0, "sae.pre_act_coefficient", f"0 {other}")
    need(s.frequency_coefficient == 0, "sae.frequency_coefficient", f"0 {other}")
    need(s.jumprelu_auxk == 0, "sae.jumprelu_auxk", f"0 {other}; TopK's is sae.aux_coefficient")
    need(s.topk_start_steps == 0, "sae.topk_start_steps", f"0 {other}")
  need(not c.sweep.target_l0 or s.sparsity_loss == "target_l0", "sweep.target_l0",
       "empty unless sae.sparsity_loss='target_l0'")
  prefixes = s.matryoshka_prefixes
  need(isinstance(prefixes, tuple | list) and all(
      isinstance(m, int) and not isinstance(m, bool) for m in prefixes) and all(
      1 <= a < b for a, b in zip(prefixes, [*prefixes[1:], s.width])), "sae.matryoshka_prefixes",
       f"a tuple of increasing ints in [1, sae.width={s.width}) (empty: no Matryoshka loss)")
  need(c.train.step_impl != "sparse" or not s.topk_start_steps, "train.step_impl",
       "'dense' or 'auto' with sae.topk_start_steps (the sparse step has no TopK phase)")
  need(c.train.step_impl != "sparse" or objectives.uses_paper_loss(c), "train.step_impl",
       "'dense' with sae.sparsity_loss other than 'l0', a pre-activation or frequency penalty, "
       "Matryoshka prefixes or sae.jumprelu_auxk (the sparse step computes the paper's loss only)")


def check_keys(c) -> None:
  """Every key must be one of configs/base.py's, of its type: a misspelled or extra key in an
  unlocked config would otherwise be ignored in silence."""
  ref, got = dict(_flat_items(base.get_config())), dict(_flat_items(c))
  problems = []
  for k in sorted(set(got) - set(ref)):
    close = difflib.get_close_matches(k, list(ref), n=1)
    problems.append(f"unknown key {k}" + (f" (did you mean {close[0]}?)" if close else
                                          " (every key is listed in configs/base.py)"))
  for k in sorted(set(ref) - set(got)):
    problems.append(f"missing key {k} (configs/base.py sets it to {ref[k]!r})")
  for k in sorted(set(ref) & set(got)):
    want, v = type(ref[k]), got[k]
    if v is None:  # a config's required placeholder: check_config says what to set
      continue
    ok = isinstance(v, (int, float) if want is float else want) and (
        want is bool or not isinstance(v, bool))  # True is an int to Python, not to us
    if not ok:
      problems.append(f"{k} must be of type {want.__name__}, got {v!r}")
  if problems:
    raise ValueError("invalid config:\n  " + "\n  ".join(problems))


def check_width(c, source_width: int, where: str) -> None:
  if source_width != c.data.d_in:
    raise ValueError(f"activations in {where} have width {source_width}, but data.d_in="
                     f"{c.data.d_in}; set --config.data.d_in={source_width} or use a store of "
                     f"width {c.data.d_in}")


def config_comments(module) -> dict[str, str]:
  """'section.key' -> the comment of a config module's `c.section.key = ...` line: the one on
  that line, or else the comment lines right above it."""
  source = inspect.getsource(module)
  inline, block = {}, {}  # line number -> comment text, for lines with code / comment only
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type == tokenize.COMMENT:
      text = tok.string.lstrip("#").strip()
      (block if tok.line.lstrip().startswith("#") else inline)[tok.start[0]] = text
  comments = {}
  for number, line in enumerate(source.splitlines(), start=1):
    m = re.match(r"\s*c\.([\w.]+)\s*=(?!=)", line)
    if not m:
      continue
    above, k = [], number - 1
    while k in block:
      above.insert(0, block[k])
      k -= 1
    comments[m.group(1)] = inline.get(number) or " ".join(above)
  return comments


def describe_config(c, base) -> str:
  """Every key of `c` in the order `base` declares it, with its value and base's comment; a
  value that differs from base's default shows the default too."""
  comments = config_comments(base)
  order = {k: i for i, k in enumerate(comments)}
  flat, ref = _flat_items(c), dict(_flat_items(base.get_config()))
  lines, section = [], None
  for key, v in sorted(flat, key=lambda kv: (order.get(kv[0], len(order)), kv[0])):
    if section is not None and key.rsplit(".", 1)[0] != section:
      lines.append("")
    section = key.rsplit(".", 1)[0]
    changed = f"  [base: {ref[key]!r}]" if key in ref and ref[key] != v else ""
    lines.append(f"{key} = {v!r}{changed}  # {comments.get(key, '(not in base)')}")
  return "\n".join(lines)


def _flat_items(node, prefix=""):
  items = []
  for k in node.keys():
    v = node[k]
    items += _flat_items(v, f"{prefix}{k}.") if hasattr(v, "keys") else [(prefix + k, v)]
  return items
