"""Decoder-only transformer forward pass (Llama family, Gemma 2) with activation hook sites.

Dimension letters: B batch, L sequence, D model width, V vocabulary, H query heads,
K key/value heads, G query heads per key/value head (H = K * G), N either H or K, Dh head width,
F MLP width, W width of a hook site.

Params are a plain dict (weights stored [in, out], i.e. transposed from torch.nn.Linear):
  embed_VxD, final_norm_D, unembed_DxV (only when embeddings are not tied),
  layers: a dict of arrays stacked over layers, so layers["q_DxHDh"] has shape [n_layers, D, H*Dh]:
    pre_attn_norm_D, q_DxHDh, k_DxKDh, v_DxKDh, o_HDhxD, pre_mlp_norm_D,
    gate_DxF, up_DxF, down_FxD, and for Gemma 2 also post_attn_norm_D, post_mlp_norm_D.
The layers run in a fori_loop, so compile time does not grow with depth. param_shapes(cfg) gives
the shapes without weights; sharding.lm_param_specs their tensor-parallel layout on a mesh.
"""

import dataclasses
import math
import re
from typing import Callable

import jax
import jax.numpy as jnp

FAMILIES = ("llama", "gemma2")
MLP_ACTS = {"silu": jax.nn.silu, "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True)}
SITE_KINDS = ("resid_post", "mlp_out", "attn_out")


@dataclasses.dataclass(frozen=True)
class LMConfig:
  """Static architecture of a decoder-only LM; hashable so it can be a static jit argument."""

  family: str  # "llama" or "gemma2": picks the norm convention and the extra Gemma 2 norms.
  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  d_ff: int
  rope_base: float = 10_000.0
  norm_eps: float = 1e-5
  tie_embeddings: bool = True
  mlp_act: str = "silu"  # "silu" (SwiGLU) or "gelu_tanh" (GeGLU).
  # Gemma 2 only; None turns each feature off.
  query_pre_attn_scalar: float | None = None  # Attention logits scale by this**-0.5; None: head_dim.
  attn_softcap: float | None = None  # Attention logits -> cap * tanh(logits / cap).
  final_softcap: float | None = None  # Output logits -> cap * tanh(logits / cap).
  sliding_window: int | None = None  # A query sees itself and the sliding_window - 1 keys before it.
  sliding_layers: tuple[int, ...] = ()  # Layers that use the sliding window; others are global.
  # Special token ids, as the checkpoint declares them (None when it declares none).
  bos_id: int | None = None
  eos_id: int | None = None
  pad_id: int | None = None
  dtype: str = "float32"  # Activation / matmul dtype; norms, RoPE and softmax run in float32.

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise ValueError(f"LMConfig.family must be one of {FAMILIES}, got {self.family!r}.")
    if self.mlp_act not in MLP_ACTS:
      raise ValueError(f"LMConfig.mlp_act must be one of {tuple(MLP_ACTS)}, got {self.mlp_act!r}.")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(
          f"LMConfig.n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads}).")
    if self.sliding_layers and self.sliding_window is None:
      raise ValueError("LMConfig.sliding_layers is set but sliding_window is None.")


def param_shapes(cfg: LMConfig) -> dict:
  """The params dict's shapes (see the module docstring), without any weights."""
  D, F, V, N = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.n_layers
  HDh, KDh = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
  layer = {"pre_attn_norm_D": (D,), "q_DxHDh": (D, HDh), "k_DxKDh": (D, KDh),
           "v_DxKDh": (D, KDh), "o_HDhxD": (HDh, D), "pre_mlp_norm_D": (D,),
           "gate_DxF": (D, F), "up_DxF": (D, F), "down_FxD": (F, D)}
  if cfg.family == "gemma2":
    layer |= {"post_attn_norm_D": (D,), "post_mlp_norm_D": (D,)}
  shapes = {"embed_VxD": (V, D), "final_norm_D": (D,),
            "layers": {k: (N, *s) for k, s in layer.items()}}
  if not cfg.tie_embeddings:
    shapes["unembed_DxV"] = (D, V)
  return shapes


# ---------------------------------------------------------------------------------------------
# Hook sites.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Site:
  """A place to read (or replace) activations: kind in SITE_KINDS, after/inside block `layer`."""

  kind: str
  layer: int

  def __post_init__(self):
    if self.kind not in SITE_KINDS:
      raise ValueError(f"Site.kind must be one of {SITE_KINDS}, got {self.kind!r}.")
    if self.layer < 0:
      raise ValueError(f"Site.layer must be >= 0, got {self.layer}.")


_TL_SUFFIX = {"resid_post": "hook_resid_post", "mlp_out": "hook_mlp_out", "attn_out": "attn.hook_z"}
_TL_KIND = {v: k for k, v in _TL_SUFFIX.items()}


def parse_site(name: str) -> Site:
  """Site from "resid_post.12" or TransformerLens style "blocks.12.hook_resid_post"."""
  m = re.fullmatch(r"(resid_post|mlp_out|attn_out)\.(\d+)", name)
  if m:
    return Site(m[1], int(m[2]))
  m = re.fullmatch(r"blocks\.(\d+)\.(hook_resid_post|hook_mlp_out|attn\.hook_z)", name)
  if m:
    return Site(_TL_KIND[m[2]], int(m[1]))
  raise ValueError(
      f"Cannot parse site name {name!r}; expected '<kind>.<layer>' with kind in {SITE_KINDS} "
      "or 'blocks.<layer>.hook_resid_post' / 'blocks.<layer>.hook_mlp_out' / "
      "'blocks.<layer>.attn.hook_z'.")


def format_site(site: Site, transformer_lens: bool = False) -> str:
  """"resid_post.12", or "blocks.12.hook_resid_post" with transformer_lens=True."""
  if transformer_lens:
    return f"blocks.{site.layer}.{_TL_SUFFIX[site.kind]}"
  return f"{site.kind}.{site.layer}"


def site_width(cfg: LMConfig, site: Site) -> int:
  """Width W of the activation at `site`."""
  return cfg.n_heads * cfg.head_dim if site.kind == "attn_out" else cfg.d_model


def _check_site(cfg: LMConfig, site: Site):
  if not isinstance(site, Site):
    raise TypeError(f"site must be a Site (see parse_site), got {type(site).__name__}: {site!r}.")
  if site.layer >= cfg.n_layers:
    raise ValueError(
        f"Site layer {site.layer} is out of range: the model has {cfg.n_layers} layers "
        f"(0..{cfg.n_layers - 1}).")


# ---------------------------------------------------------------------------------------------
# Layers.
# ---------------------------------------------------------------------------------------------


def rms_norm(x_BxLxD, w_D, cfg: LMConfig):
  """RMSNorm in float32; Gemma stores the scale as an offset from 1."""
  x = x_BxLxD.astype(jnp.float32)
  x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + cfg.norm_eps)
  scale = 1.0 + w_D.astype(jnp.float32) if cfg.family == "gemma2" else w_D.astype(jnp.float32)
  return (x * scale).astype(x_BxLxD.dtype)


def rope(x_BxLxNxDh, base: float):
  """Rotary embedding, rotating the two halves of each head as HF's rotate_half does."""
  _, L, _, Dh = x_BxLxNxDh.shape
  inv_freq = 1.0 / (base ** (jnp.arange(0, Dh, 2, dtype=jnp.float32) / Dh))
  angle_LxDh2 = jnp.arange(L, dtype=jnp.float32)[:, None] * inv_freq[None, :]
  cos = jnp.cos(angle_LxDh2)[None, :, None, :]
  sin = jnp.sin(angle_LxDh2)[None, :, None, :]
  x = x_BxLxNxDh.astype(jnp.float32)
  x1, x2 = x[..., : Dh // 2], x[..., Dh // 2 :]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxLxNxDh.dtype)


def softcap(x, cap: float | None):
  return x if cap is None else cap * jnp.tanh(x / cap)


def attention(p, x_BxLxD, cfg: LMConfig, sliding):
  """Grouped-query causal self-attention; returns per-head outputs z_BxLxHDh before o_proj.

  `sliding` (a traced bool) restricts each query to the last cfg.sliding_window keys.
  """
  B, L, _ = x_BxLxD.shape
  H, K, Dh = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  G = H // K
  dt = x_BxLxD.dtype
  q_BxLxHxDh = (x_BxLxD @ p["q_DxHDh"].astype(dt)).reshape(B, L, H, Dh)
  k_BxLxKxDh = (x_BxLxD @ p["k_DxKDh"].astype(dt)).reshape(B, L, K, Dh)
  v_BxLxKxDh = (x_BxLxD @ p["v_DxKDh"].astype(dt)).reshape(B, L, K, Dh)
  q_BxLxHxDh = rope(q_BxLxHxDh, cfg.rope_base)
  k_BxLxKxDh = rope(k_BxLxKxDh, cfg.rope_base)

  # Query head h reads key/value head h // G, as HF's repeat_kv lays them out.
  q_BxLxKxGxDh = q_BxLxHxDh.reshape(B, L, K, G, Dh)
  logits_BxKxGxLxL = jnp.einsum(
      "bqkgd,bskd->bkgqs", q_BxLxKxGxDh, k_BxLxKxDh, preferred_element_type=jnp.float32)
  scalar = cfg.query_pre_attn_scalar if cfg.query_pre_attn_scalar is not None else Dh
  logits_BxKxGxLxL = softcap(logits_BxKxGxLxL * scalar**-0.5, cfg.attn_softcap)

  q_pos = jnp.arange(L)[:, None]
  k_pos = jnp.arange(L)[None, :]
  mask_LxL = k_pos <= q_pos
  if cfg.sliding_layers:
    # HF's sliding_window_overlay: key kept iff k > q - window.
    mask_LxL = mask_LxL & (~sliding | (q_pos - k_pos < cfg.sliding_window))
  logits_BxKxGxLxL = jnp.where(mask_LxL, logits_BxKxGxLxL, jnp.finfo(jnp.float32).min)
  probs_BxKxGxLxL = jax.nn.softmax(logits_BxKxGxLxL, axis=-1).astype(dt)

  z_BxLxKxGxDh = jnp.einsum("bkgqs,bskd->bqkgd", probs_BxKxGxLxL, v_BxLxKxDh)
  return z_BxLxKxGxDh.reshape(B, L, H * Dh)


def mlp(p, x_BxLxD, cfg: LMConfig):
  """Gated MLP: down(act(gate(x)) * up(x))."""
  dt = x_BxLxD.dtype
  gate_BxLxF = MLP_ACTS[cfg.mlp_act](x_BxLxD @ p["gate_DxF"].astype(dt))
  up_BxLxF = x_BxLxD @ p["up_DxF"].astype(dt)
  return (gate_BxLxF * up_BxLxF) @ p["down_FxD"].astype(dt)


# ---------------------------------------------------------------------------------------------
# Forward.
# ---------------------------------------------------------------------------------------------


def forward(
    params,
    cfg: LMConfig,
    tokens_BxL,
    *,
    site: Site | None = None,
    stop_at_site: bool = False,
    replace_fn: Callable | None = None,
    resid_BxLxD=None,
):
  """Runs the LM; returns (logits_BxLxV or None, activation_BxLxW at `site` or None).

  With `stop_at_site` no layer after the site is computed and logits are None. With `replace_fn`
  the site's activation is replaced by replace_fn(act) for the rest of the forward pass; the
  returned activation is still the original one. With `resid_BxLxD` (a resid_post site only)
  the layers up to the site are skipped: the rest of the pass runs from that residual, as if
  replace_fn had returned it, and the activation returned is None. Jit with
  `jax.jit(forward, static_argnames=("cfg", "site", "stop_at_site", "replace_fn"))`.
  """
  if site is not None:
    _check_site(cfg, site)
  elif stop_at_site or replace_fn is not None or resid_BxLxD is not None:
    raise ValueError("stop_at_site, replace_fn and resid_BxLxD need a site.")
  if resid_BxLxD is not None and (site.kind != "resid_post" or stop_at_site or replace_fn):
    raise ValueError(f"resid_BxLxD resumes after a resid_post site without stop_at_site or "
                     f"replace_fn; got site kind {site.kind!r}")
  dt = jnp.dtype(cfg.dtype)
  gemma = cfg.family == "gemma2"
  B, L = tokens_BxL.shape
  sliding_N = jnp.asarray([i in cfg.sliding_layers for i in range(cfg.n_layers)])

  def layer(i, carry):
    x_BxLxD, act_BxLxW = carry
    p = jax.tree.map(lambda a: a[i], params["layers"])

    def hook(kind, a):
      """Records the site's activation and splices in replace_fn(activation)."""
      nonlocal act_BxLxW
      if site is None or site.kind != kind or resid_BxLxD is not None:
        return a
      at_site = i == site.layer
      act_BxLxW = jnp.where(at_site, a, act_BxLxW)
      if replace_fn is None:
        return a
      return jax.lax.cond(at_site, lambda a: replace_fn(a).astype(a.dtype), lambda a: a, a)

    z_BxLxHDh = attention(p, rms_norm(x_BxLxD, p["pre_attn_norm_D"], cfg), cfg, sliding_N[i])
    z_BxLxHDh = hook("attn_out", z_BxLxHDh)
    a_BxLxD = z_BxLxHDh @ p["o_HDhxD"].astype(dt)
    if gemma:
      a_BxLxD = rms_norm(a_BxLxD, p["post_attn_norm_D"], cfg)
    x_BxLxD = x_BxLxD + a_BxLxD

    m_BxLxD = mlp(p, rms_norm(x_BxLxD, p["pre_mlp_norm_D"], cfg), cfg)
    if gemma:
      m_BxLxD = rms_norm(m_BxLxD, p["post_mlp_norm_D"], cfg)
    m_BxLxD = hook("mlp_out", m_BxLxD)
    x_BxLxD = hook("resid_post", x_BxLxD + m_BxLxD)
    return x_BxLxD, act_BxLxW

  if resid_BxLxD is not None:  # the layers after the site only; its hook never runs
    x_BxLxD, act_BxLxW = jax.lax.fori_loop(site.layer + 1, cfg.n_layers, layer,
                                           (resid_BxLxD.astype(dt), None))
  else:
    x_BxLxD = params["embed_VxD"][tokens_BxL].astype(dt)
    if gemma:
      # HF multiplies by sqrt(d_model) cast to the activation dtype (48.0 or 59.87 -> 60.0 in bf16).
      x_BxLxD = x_BxLxD * jnp.asarray(math.sqrt(cfg.d_model), dt)
    act_BxLxW = None if site is None else jnp.zeros((B, L, site_width(cfg, site)), dt)
    n_run = site.layer + 1 if stop_at_site else cfg.n_layers  # Later layers are never run.
    x_BxLxD, act_BxLxW = jax.lax.fori_loop(0, n_run, layer, (x_BxLxD, act_BxLxW))
  if stop_at_site:
    return None, act_BxLxW

  x_BxLxD = rms_norm(x_BxLxD, params["final_norm_D"], cfg)
  if cfg.tie_embeddings:
    logits_BxLxV = jnp.einsum("bld,vd->blv", x_BxLxD, params["embed_VxD"].astype(dt))
  else:
    logits_BxLxV = x_BxLxD @ params["unembed_DxV"].astype(dt)
  return softcap(logits_BxLxV, cfg.final_softcap), act_BxLxW
