"""Config checks that run before any data is read or anything is compiled."""
from jumprelu import ops, sae

DATA_SOURCES = ("npy", "synthetic")


def check_config(c) -> None:
  """Raises one ValueError listing every bad key, with the expected and the actual value."""
  problems = []

  def need(ok, key, expected):
    if not ok:
      value = c
      for part in key.split("."):
        value = value[part]
      problems.append(f"{key} must be {expected}, got {value!r}")

  need(c.data.source in DATA_SOURCES, "data.source", f"one of {DATA_SOURCES}")
  need(c.data.source != "npy" or bool(c.data.path), "data.path",
       "a .npy file or a directory of .npy shards when data.source='npy'")
  need(c.data.d_in > 0, "data.d_in", "the activation width D (> 0)")
  need(c.data.norm_rows > 0, "data.norm_rows", "> 0")
  need(c.sae.width > 0, "sae.width", "> 0")
  need(c.sae.sparsity_coefficient >= 0, "sae.sparsity_coefficient", ">= 0")
  need(c.sae.bandwidth > 0, "sae.bandwidth", "> 0")
  need(c.sae.kernel in ops.KERNELS, "sae.kernel", f"one of {ops.KERNELS}")
  need(c.sae.threshold_init > 0, "sae.threshold_init", "> 0")
  need(c.sae.threshold_param in sae.THRESHOLD_PARAMS, "sae.threshold_param",
       f"one of {sae.THRESHOLD_PARAMS}")
  need(c.optim.learning_rate > 0, "optim.learning_rate", "> 0")
  need(0 <= c.optim.b1 < 1, "optim.b1", "in [0, 1)")
  need(0 <= c.optim.b2 < 1, "optim.b2", "in [0, 1)")
  need(c.optim.eps > 0, "optim.eps", "> 0")
  need(c.optim.lr_warmup_steps >= 0, "optim.lr_warmup_steps", ">= 0")
  need(0 < c.optim.lr_warmup_init <= 1, "optim.lr_warmup_init", "in (0, 1]")
  need(c.optim.sparsity_warmup_steps >= 0, "optim.sparsity_warmup_steps", ">= 0")
  need(c.train.batch_size > 0, "train.batch_size", "> 0")
  need(c.train.num_steps > 0, "train.num_steps", "> 0")
  need(c.train.log_every > 0, "train.log_every", "> 0")
  need(c.train.checkpoint_every > 0, "train.checkpoint_every", "> 0")
  need(c.train.keep_checkpoints >= 1, "train.keep_checkpoints", ">= 1")
  need(c.train.dead_window_tokens > 0, "train.dead_window_tokens", "> 0")
  need(c.mesh.data == -1 or c.mesh.data >= 1, "mesh.data", ">= 1 or -1 (all devices left)")
  need(c.mesh.model == -1 or c.mesh.model >= 1, "mesh.model", ">= 1 or -1 (all devices)")
  if c.data.source == "synthetic":
    s = c.data.synthetic
    need(s.n_rows > 0, "data.synthetic.n_rows", "> 0")
    need(s.n_features > 0, "data.synthetic.n_features", "> 0")
    need(0 < s.mean_l0 <= s.n_features / 2, "data.synthetic.mean_l0",
         "in (0, n_features / 2]")
    need(s.noise_std >= 0, "data.synthetic.noise_std", ">= 0")
  if problems:
    raise ValueError("invalid config:\n  " + "\n  ".join(problems))


def check_width(c, source_width: int, where: str) -> None:
  if source_width != c.data.d_in:
    raise ValueError(f"activations in {where} have width {source_width}, but data.d_in="
                     f"{c.data.d_in}; set --config.data.d_in={source_width} or use a store of "
                     f"width {c.data.d_in}")
