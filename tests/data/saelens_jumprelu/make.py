"""Regenerates this fixture with SAELens itself (not needed by the tests):
pip install torch==2.13.0 sae-lens==6.54.12 && python tests/data/saelens_jumprelu/make.py

A JumpReLU SAE with apply_b_dec_to_input=True (SAELens's default, unlike ours) saved by
SAELens's own save_model, some inputs x, and SAELens's encode/decode of them.
"""
import os

import numpy as np
import sae_lens
import torch
from safetensors.numpy import save_file
from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig

HERE = os.path.dirname(os.path.abspath(__file__))
torch.manual_seed(0)
sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=8, d_sae=32, apply_b_dec_to_input=True))
with torch.no_grad():
  sae.W_enc.normal_(0, 0.5)
  sae.W_dec.normal_(0, 0.5)
  sae.b_enc.normal_(0, 0.1)
  sae.b_dec.normal_(0, 1.0)
  sae.threshold.uniform_(0.1, 1.0)
  x = torch.randn(16, 8) * 2
  f = sae.encode(x)
  x_hat = sae.decode(f)
sae.save_model(HERE)
save_file({"sparsity": np.log10(np.linspace(0.0, 0.5, 32) + 1e-10).astype(np.float32)},
          os.path.join(HERE, "sparsity.safetensors"))
np.savez(os.path.join(HERE, "io.npz"), x=x.numpy(), f=f.numpy(), x_hat=x_hat.numpy(),
         sae_lens_version=sae_lens.__version__)
