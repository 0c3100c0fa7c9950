"""Hook-site names, widths and errors (no torch needed)."""

import jax.numpy as jnp
import pytest

from jumprelu.lm import model
from jumprelu.lm.model import Site


def test_site_names_round_trip():
  for kind in model.SITE_KINDS:
    site = Site(kind, 12)
    assert model.parse_site(model.format_site(site)) == site
    assert model.parse_site(model.format_site(site, transformer_lens=True)) == site
  assert model.format_site(Site("attn_out", 3), transformer_lens=True) == "blocks.3.attn.hook_z"
  assert model.format_site(Site("mlp_out", 3), transformer_lens=True) == "blocks.3.hook_mlp_out"
  assert model.parse_site("blocks.7.hook_resid_post") == Site("resid_post", 7)
  with pytest.raises(ValueError, match="resid_pre"):
    model.parse_site("resid_pre.3")


def test_site_errors_are_clear():
  cfg = model.LMConfig(family="gemma2", vocab_size=8, d_model=4, n_layers=2, n_heads=2,
                       n_kv_heads=1, head_dim=3, d_ff=8)
  assert model.site_width(cfg, Site("attn_out", 0)) == 6  # n_heads * head_dim, not d_model.
  assert model.site_width(cfg, Site("mlp_out", 0)) == 4
  with pytest.raises(ValueError, match="out of range: the model has 2 layers"):
    model.forward({}, cfg, jnp.zeros((1, 2), jnp.int32), site=Site("mlp_out", 2))
  with pytest.raises(ValueError, match="kind must be one of"):
    Site("resid_mid", 0)
  with pytest.raises(ValueError, match="family must be one of"):
    model.LMConfig(family="gpt2", vocab_size=8, d_model=4, n_layers=2, n_heads=2,
                   n_kv_heads=1, head_dim=2, d_ff=8)
