"""Parity of jumprelu.lm.model with transformers (torch, fp32): logits and hook activations."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jumprelu.lm import load, model
from jumprelu.lm.model import Site

torch = pytest.importorskip("torch")
# Idle torch worker threads slow XLA compilation on a 2-core machine; the references are tiny.
torch.set_num_threads(1)
transformers = pytest.importorskip("transformers")

forward = jax.jit(model.forward, static_argnames=("cfg", "site", "stop_at_site", "replace_fn"))

PARAGRAPHS = [
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type with an oil-based ink and a wooden press. Within a few decades "
    "printers across Europe were producing books faster and more cheaply than scribes ever could, "
    "and ideas began to travel further than their authors.",
    "A sparse autoencoder learns to rewrite the activations of a language model as a sum of a few "
    "directions chosen from a much larger dictionary. Researchers hope that each direction stands "
    "for a single concept, so that the model's computation can be read one feature at a time.",
]


def torch_run(ref, family, tokens_BxL, layer, replace=None):
  """Reference logits and the three hook activations at `layer`; `replace` zeroes one site."""
  block = ref.model.layers[layer]
  mlp_module = block.post_feedforward_layernorm if family == "gemma2" else block.mlp
  acts = {}

  def out_hook(kind, module, inputs, output):
    out = output[0] if isinstance(output, tuple) else output
    acts[kind] = out.detach().numpy().copy()
    if replace == kind:
      return (torch.zeros_like(out),) + tuple(output[1:]) if isinstance(output, tuple) else \
          torch.zeros_like(out)

  def z_hook(module, inputs):
    acts["attn_out"] = inputs[0].detach().numpy().copy()
    if replace == "attn_out":
      return (torch.zeros_like(inputs[0]),)

  handles = [
      block.register_forward_hook(functools.partial(out_hook, "resid_post")),
      mlp_module.register_forward_hook(functools.partial(out_hook, "mlp_out")),
      block.self_attn.o_proj.register_forward_pre_hook(z_hook),
  ]
  try:
    with torch.no_grad():
      logits = ref(torch.tensor(np.asarray(tokens_BxL))).logits.numpy()
  finally:
    for h in handles:
      h.remove()
  return logits, acts


def rel_err(a, ref):
  return float(np.abs(np.asarray(a) - ref).max() / np.abs(ref).max())


# ---------------------------------------------------------------------------------------------
# SmolLM2-135M (GGUF) against transformers' own GGUF load.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_case(smollm2, smollm2_torch):
  params, cfg, tok = smollm2
  ids = [tok.encode(p, add_special_tokens=False).ids for p in PARAGRAPHS]
  L = min(map(len, ids))
  tokens_BxL = jnp.asarray([i[:L] for i in ids], jnp.int32)
  layer = cfg.n_layers // 2
  ref_logits, ref_acts = torch_run(smollm2_torch, "llama", tokens_BxL, layer)
  return params, cfg, tokens_BxL, layer, ref_logits, ref_acts


def test_smollm2_logits_match_transformers(smollm2_case):
  params, cfg, tokens_BxL, layer, ref_logits, ref_acts = smollm2_case
  logits, act = forward(params, cfg, tokens_BxL, site=Site("resid_post", layer))
  logits = np.asarray(logits)
  diff = np.abs(logits - ref_logits).max()
  print(f"SmolLM2 logits max|diff| {diff:.3g} (max|logit| {np.abs(ref_logits).max():.3g})")
  assert diff <= 1e-3
  np.testing.assert_array_equal(logits.argmax(-1), ref_logits.argmax(-1))
  err = rel_err(act, ref_acts["resid_post"])
  print(f"SmolLM2 resid_post.{layer} max|diff|/max|ref| {err:.3g}")
  assert err <= 1e-4


@pytest.mark.parametrize("kind", ["resid_post", "mlp_out", "attn_out"])
def test_smollm2_hooks_match_transformers(smollm2_case, kind):
  params, cfg, tokens_BxL, layer, _, ref_acts = smollm2_case
  site = Site(kind, layer)
  logits, act = forward(params, cfg, tokens_BxL, site=site, stop_at_site=True)
  assert logits is None
  assert act.shape == (*tokens_BxL.shape, model.site_width(cfg, site))
  err = rel_err(act, ref_acts[kind])
  print(f"SmolLM2 {kind}.{layer} max|diff| {np.abs(np.asarray(act) - ref_acts[kind]).max():.3g} "
        f"max|diff|/max|ref| {err:.3g}")
  assert err <= 1e-4


def test_smollm2_stop_at_site_equals_full_forward(smollm2_case):
  params, cfg, tokens_BxL, layer, _, _ = smollm2_case
  site = Site("resid_post", layer)
  _, full = forward(params, cfg, tokens_BxL, site=site)
  _, stopped = forward(params, cfg, tokens_BxL, site=site, stop_at_site=True)
  np.testing.assert_allclose(stopped, full, rtol=0, atol=1e-6 * float(jnp.abs(full).max()))


# ---------------------------------------------------------------------------------------------
# Tiny random Gemma 2 and Llama checkpoints written by transformers, read by load_hf.
# ---------------------------------------------------------------------------------------------

VOCAB = 300


def tiny_torch_model(family):
  torch.manual_seed(0)
  common = dict(
      vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4,
      num_key_value_heads=2, initializer_range=0.2, bos_token_id=1, eos_token_id=2,
      pad_token_id=0)
  if family == "gemma2":
    # A window shorter than the sequence, so the local layers (0 and 2) really are local, and
    # heads * head_dim != hidden_size, as in Gemma 2 2B (8 * 256 != 2304).
    config = transformers.Gemma2Config(
        num_hidden_layers=4, head_dim=24, query_pre_attn_scalar=24, sliding_window=5,
        attn_logit_softcapping=5.0, final_logit_softcapping=8.0, rope_parameters={
            "rope_type": "default", "rope_theta": 1000.0}, **common)
    config._attn_implementation = "eager"  # Gemma 2's soft-capping needs eager attention.
    ref = transformers.Gemma2ForCausalLM(config)
  else:
    config = transformers.LlamaConfig(
        num_hidden_layers=3, head_dim=16, tie_word_embeddings=False, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0}, **common)
    ref = transformers.LlamaForCausalLM(config)
  with torch.no_grad():
    for name, p in ref.named_parameters():
      if "norm" in name:  # Norm weights start at 0 (Gemma) or 1 (Llama); make them matter.
        p.add_(0.3 * torch.randn_like(p))
  return ref.eval()


def save_tiny_tokenizer(path):
  """A small byte-level BPE tokenizer.json, so the directory looks like a real checkpoint."""
  tokenizers = pytest.importorskip("tokenizers")
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=VOCAB, special_tokens=["<pad>", "<bos>", "<eos>"],
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(PARAGRAPHS, trainer)
  tok.save(str(path / "tokenizer.json"))


@pytest.fixture(scope="module", params=["gemma2", "llama"])
def tiny(request, tmp_path_factory):
  family = request.param
  ref = tiny_torch_model(family)
  path = tmp_path_factory.mktemp(family)
  ref.save_pretrained(path)
  save_tiny_tokenizer(path)
  params, cfg, tok = load.load(str(path))  # A directory dispatches to load_hf.
  tokens_BxL = jnp.asarray(np.random.RandomState(0).randint(0, VOCAB, (2, 12)), jnp.int32)
  return family, ref, params, cfg, tok, tokens_BxL


def test_tiny_config(tiny):
  family, ref, params, cfg, tok, _ = tiny
  assert cfg.family == family
  assert cfg.n_layers == ref.config.num_hidden_layers
  assert (cfg.n_heads, cfg.n_kv_heads) == (4, 2)
  assert cfg.head_dim == (24 if family == "gemma2" else 16)
  assert params["layers"]["o_HDhxD"].shape == (cfg.n_layers, 4 * cfg.head_dim, 64)
  assert (cfg.bos_id, cfg.eos_id, cfg.pad_id) == (1, 2, 0)
  if family == "gemma2":
    assert cfg.sliding_layers == (0, 2)
    assert (cfg.sliding_window, cfg.attn_softcap, cfg.final_softcap) == (5, 5.0, 8.0)
    assert cfg.mlp_act == "gelu_tanh" and cfg.tie_embeddings and "unembed_DxV" not in params
  else:
    assert cfg.mlp_act == "silu" and not cfg.tie_embeddings and "unembed_DxV" in params
  assert max(tok.encode("printing press").ids) < cfg.vocab_size


def tiny_site_forward(tiny, kind):
  """Full forward with a site at layer 1; every test that needs it shares one compilation."""
  _, _, params, cfg, _, tokens_BxL = tiny
  return forward(params, cfg, tokens_BxL, site=Site(kind, 1))


def test_tiny_logits_and_hooks_match_transformers(tiny):
  # Layer 1 is global and reads the output of layer 0, which slides in Gemma 2.
  family, ref, params, cfg, _, tokens_BxL = tiny
  ref_logits, ref_acts = torch_run(ref, family, tokens_BxL, 1)
  for kind in ("resid_post", "mlp_out", "attn_out"):
    logits, act = tiny_site_forward(tiny, kind)
    diff = np.abs(np.asarray(logits) - ref_logits).max()
    act_diff = np.abs(np.asarray(act) - ref_acts[kind]).max()
    print(f"tiny {family} logits max|diff| {diff:.3g}; {kind}.1 max|diff| {act_diff:.3g}")
    assert diff <= 1e-4
    assert act_diff <= 1e-4 * max(1.0, np.abs(ref_acts[kind]).max())


def test_tiny_softcaps_and_window_are_active(tiny):
  family, _, params, cfg, _, tokens_BxL = tiny
  if family != "gemma2":
    pytest.skip("Gemma 2 only")
  logits, _ = tiny_site_forward(tiny, "resid_post")
  # With every layer global the logits must change, so the window is in play in these tests.
  global_logits, _ = forward(params, dataclasses.replace(cfg, sliding_layers=()), tokens_BxL,
                             site=Site("resid_post", 1))
  assert np.abs(np.asarray(logits - global_logits)).max() > 1e-3
  raw_logits, _ = forward(params, dataclasses.replace(cfg, final_softcap=None), tokens_BxL,
                          site=Site("resid_post", 1))
  assert np.abs(np.asarray(raw_logits)).max() > 0.5 * cfg.final_softcap


def test_tiny_replace_fn_identity_changes_nothing(tiny):
  _, _, params, cfg, _, tokens_BxL = tiny
  logits, act = tiny_site_forward(tiny, "resid_post")
  same_logits, same_act = forward(
      params, cfg, tokens_BxL, site=Site("resid_post", 1), replace_fn=lambda a: a)
  np.testing.assert_allclose(same_logits, logits, rtol=0, atol=1e-5)
  np.testing.assert_allclose(same_act, act, rtol=0, atol=1e-5)


def test_tiny_resume_after_the_site_equals_replacing_there(tiny):
  """resid_BxLxD (the spliced evaluation's shortcut) gives the logits replace_fn would."""
  _, _, params, cfg, _, tokens_BxL = tiny
  site = Site("resid_post", 1)
  _, act = forward(params, cfg, tokens_BxL, site=site)
  edited = act * 0.5 + 0.1  # a real change, not the identity
  want, _ = forward(params, cfg, tokens_BxL, site=site, replace_fn=lambda a: a * 0.5 + 0.1)
  got, none = forward(params, cfg, tokens_BxL, site=site, resid_BxLxD=edited)
  assert none is None
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
  with pytest.raises(ValueError, match="resid_post site .* got site kind 'mlp_out'"):
    model.forward(params, cfg, tokens_BxL, site=Site("mlp_out", 1), resid_BxLxD=act)


@pytest.mark.parametrize("kind", ["resid_post", "mlp_out", "attn_out"])
def test_tiny_replace_fn_zeros_matches_transformers(tiny, kind):
  family, ref, params, cfg, _, tokens_BxL = tiny
  if family == "llama" and kind != "mlp_out":
    pytest.skip("Gemma 2 covers every site; one Llama site keeps the test fast.")
  logits, act = tiny_site_forward(tiny, kind)
  zero_logits, zero_act = forward(
      params, cfg, tokens_BxL, site=Site(kind, 1), replace_fn=jnp.zeros_like)
  np.testing.assert_allclose(zero_act, act, rtol=0, atol=1e-5)  # The original comes back.
  assert np.abs(np.asarray(zero_logits - logits)).max() > 1e-2
  ref_zero_logits, _ = torch_run(ref, family, tokens_BxL, 1, replace=kind)
  assert np.abs(np.asarray(zero_logits) - ref_zero_logits).max() <= 1e-4


def test_tiny_stop_at_site(tiny):
  _, _, params, cfg, _, tokens_BxL = tiny
  _, full = tiny_site_forward(tiny, "attn_out")
  logits, stopped = forward(params, cfg, tokens_BxL, site=Site("attn_out", 1), stop_at_site=True)
  assert logits is None
  np.testing.assert_allclose(stopped, full, rtol=0, atol=1e-5)


def test_tiny_bf16_activations(tiny):
  _, _, params, cfg, _, tokens_BxL = tiny
  logits, _ = tiny_site_forward(tiny, "resid_post")
  bf16_logits, act = forward(params, dataclasses.replace(cfg, dtype="bfloat16"), tokens_BxL,
                             site=Site("resid_post", 1))
  assert bf16_logits.dtype == jnp.bfloat16 and act.dtype == jnp.bfloat16
  scale = float(jnp.abs(logits).max())
  assert float(jnp.abs(bf16_logits.astype(jnp.float32) - logits).max()) < 0.05 * scale


def test_load_hf_reads_bf16_checkpoint(tmp_path):
  ref = tiny_torch_model("llama").to(torch.bfloat16)
  ref.save_pretrained(tmp_path)
  save_tiny_tokenizer(tmp_path)
  params, cfg, _ = load.load_hf(str(tmp_path))
  want = ref.model.layers[0].self_attn.q_proj.weight.detach().float().numpy().T
  np.testing.assert_array_equal(params["layers"]["q_DxHDh"][0], want)
  assert params["layers"]["q_DxHDh"][0].dtype == jnp.float32
