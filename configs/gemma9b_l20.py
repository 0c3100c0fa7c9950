"""Gemma 2 9B, layer 20 residual stream, 131k-wide JumpReLU SAE: the full Gemma Scope recipe.

Point lm.model_path at a local Hugging Face checkpoint directory of google/gemma-2-9b; the job
harvests activations from The Pile (text.source="hf", needs `pip install datasets` and the hub)
into a bfloat16 store (57 TB for 8B tokens), then trains and evaluates:
  python experiments/train.py --config=configs/gemma9b_l20.py --workdir=DIR \\
      --config.lm.model_path=/path/to/gemma-2-9b
To train on activations harvested elsewhere: --config.data.source=npy --config.data.path=STORE.
Check the per-device memory first (reads only config.json): add --dry_run; every program
compiled for a TPU topology: scripts/aot_tpu.py --config=configs/gemma9b_l20.py --topology=v5e:2x4
--config.lm.model_path=tests/data/gemma2_9b (BENCHMARKS.md: all fit a v5e's 16 GiB).
"""
from ml_collections import config_dict

from configs import base


def get_config():
  c = base.get_config()
  c.data.source = "harvest"
  c.data.d_in = 3584  # Gemma 2 9B d_model
  c.data.norm_rows = 1_000_000
  # Required: a local gemma-2-9b checkpoint directory (config.json + safetensors + tokenizer).
  c.lm.model_path = config_dict.placeholder(str)
  c.lm.site = "resid_post.20"
  c.lm.context_len = 1024
  c.lm.batch_contexts = 64  # per process per forward: 64 × 1,024 tokens (fits a v5e host's 4 chips)
  c.lm.dtype = "bfloat16"  # inference in bf16 is fine for harvesting (the recipe's precision)
  c.lm.param_dtype = "bfloat16"  # 18.5 GB of weights (float32: 37 GB, more than any chip holds)
  c.lm.model_parallel = 4  # a TPU host's 4 chips (v5e, v5p, v4) split each layer: 4.6 GB each
  c.text.source = "hf"  # The Pile, as Gemma Scope; needs `pip install datasets` and the hub
  c.text.path = "monology/pile-uncopyrighted"
  c.harvest.num_tokens = 8_000_000_000
  c.harvest.shard_tokens = 1 << 20
  c.harvest.dtype = "bfloat16"  # 8B × 3,584 × 2 bytes = 57 TB (float32 would be 115 TB)
  # auto: on the pod (many TPU processes) one LM over every chip, in lockstep rounds, as XLA
  # there refuses programs on one host's chips; local on one host or on CPUs/GPUs
  c.harvest.mesh = "auto"
  c.eval.num_contexts = 2048  # the report's 2,048 × 1,024-token evaluation
  # The Pile's validation split: held out by construction, and reached without tokenising the
  # ~8M training contexts first (eval.skip_contexts counts from the split's start)
  c.eval.split = "validation"
  c.eval.skip_contexts = 0
  # per process per forward: the [B, 1024, 256000] float32 logits of 8 contexts need 22.7 GiB
  # of temporaries per v5e chip (scripts/aot_tpu.py); 2 fit
  c.eval.batch_contexts = 2
  c.sae.width = 131072  # 2^17
  c.sae.sparsity_coefficient = 1e-3  # sweep with --config.sae.sparsity_coefficient=...
  c.sae.bandwidth = 0.001
  c.sae.threshold_init = 0.001
  c.optim.learning_rate = 7e-5
  c.optim.lr_warmup_steps = 1000
  c.optim.sparsity_warmup_steps = 10000
  c.train.batch_size = 4096
  # 8B tokens: between the report's 4B (16k wide) and 16B (1M wide) budgets.
  c.train.num_steps = 8_000_000_000 // 4096
  c.train.log_every = 1000
  c.train.checkpoint_every = 20000
  c.train.dead_window_tokens = 10_000_000
  c.train.step_impl = "auto"  # dense on TPU (the sparse step does not compile there in time)
  c.export.model_name = "google/gemma-2-9b"  # its Hugging Face id, which TransformerLens loads
  c.export.hook_name = "blocks.20.hook_resid_post"
  c.export.context_size = 1024
  # Above 16k wide Gemma Scope split the dictionary across devices (tensor parallel).
  c.mesh.data = 1
  c.mesh.model = -1
  return c
