"""Live activations: the LM computes them chunk by chunk while training runs, instead of a store
being read."""
import numpy as np

from jumprelu import data
from jumprelu.lm import activations as lm_act
from jumprelu.lm import model


class LiveSource:
  """Activations computed by the LM while training runs, instead of read from a store.

  Chunk k holds every ordinary token of contexts [k·C, (k+1)·C) (C = data.live_chunk_contexts;
  the text restarts when it runs out); steps [k·S, (k+1)·S) (S = data.live_chunk_steps) draw
  their batches from it, shuffled statelessly by (seed, k). The batch at a step is thus a pure
  function of (seed, step): a resumed run recomputes its chunk and reads the same rows.
  """

  def __init__(self, c, lm=None):
    self.c = c
    self.params, self.cfg, self.tokenizer, name = lm or lm_act.load_lm(c)
    self.site = model.parse_site(c.lm.site)
    self.d = model.site_width(self.cfg, self.site)
    self.names = [f"live {name} {c.lm.site}"]
    self.n = 0  # rows of the current chunk (for the log line)
    self._stream, self._next_ctx, self._k, self._chunk = None, 0, None, None
    self._forward = lm_act.site_fn(self.cfg, self.site)

  def _contexts(self, first: int, count: int) -> list[np.ndarray]:
    """Contexts first … first+count−1 of the endlessly repeated packed text."""
    if self._stream is None or first < self._next_ctx:
      self._stream, self._next_ctx = lm_act.contexts(self.c, self.cfg, self.tokenizer), 0
    out = []
    while len(out) < count:
      try:
        tokens = next(self._stream)
      except StopIteration:
        if self._next_ctx == 0:
          raise ValueError(f"text.source {self.c.text.source!r} yields no context of "
                           f"{self.c.lm.context_len} tokens") from None
        self._stream = lm_act.contexts(self.c, self.cfg, self.tokenizer)  # another pass over the text
        continue
      if self._next_ctx >= first:
        out.append(tokens)
      self._next_ctx += 1
    return out

  def chunk(self, k: int) -> data.ActivationSource:
    if k != self._k:
      per_batch, count = self.c.lm.batch_contexts, self.c.data.live_chunk_contexts
      ctx = self._contexts(k * count, count)
      rows = []
      for lo in range(0, count, per_batch):
        rows += lm_act.context_rows(self.c, self._forward, self.params, self.cfg,
                             ctx[lo:lo + per_batch])
      self._k, self._chunk = k, data.ActivationSource(
          [np.concatenate(rows)], self.names, seed=(self.c.seed * 1_000_003 + k) % 2**63)
      self.n = self._chunk.n
    return self._chunk

  def batch(self, step: int, batch_size: int, lo: int = 0, hi: int | None = None):
    k, s = divmod(step, self.c.data.live_chunk_steps)
    return self.chunk(k).batch(s, batch_size, lo, hi)

  def batch_skipping_nonfinite(self, step: int, batch_size: int, lo: int = 0,
                               hi: int | None = None):
    k, s = divmod(step, self.c.data.live_chunk_steps)
    return self.chunk(k).batch_skipping_nonfinite(s, batch_size, lo, hi)

  def mean_sq_norm(self, n_rows: int, skip_nonfinite: bool = False) -> float:
    return self.chunk(0).mean_sq_norm(n_rows, skip_nonfinite)
