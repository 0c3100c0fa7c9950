"""Feature absorption on the first-letter task, as SAEBench defines it (Karvonen et al. 2025,
arXiv 2503.09532, after Chanin et al. 2024, "A is for Absorption", arXiv 2409.14507).

Needs only the tokenizer's vocabulary and the LM:
1. Words: the vocabulary's tokens made of ASCII letters alone (a leading space allowed); the
   label is the lower-cased first letter. Each word is read in an in-context prompt,
   "{icl word} has the first letter: {L}" lines, then "{word} has the first letter:", at the
   word's position (the activation SAEBench reads).
2. A ground-truth probe: one-vs-rest logistic regression per letter on the LM activations of
   the training words.
3. Main features per letter: k-sparse probes on the SAE features an L1 probe ranks highest,
   k = 1 .. max_k; k grows while the held-out F1 rises by more than f1_jump (0.03).
4. On the held-out words of letter L that the ground-truth probe gets right (its true
   positives), with u the unit probe direction, x the activation, f the SAE features and
   cosᵢ = cos(u, W_dec,i), per word (word_absorption below, SAEBench's calculator):
   - absorption fraction: the probe projection x·u that the main features do not carry but up
     to 3 other features with cos ≥ 0.1 and fᵢcosᵢ > 0 do, as a fraction (0 when the main
     features carry all of it or the others carry less than 40% of x·u; 1 when the main
     features carry nothing);
   - full absorption: no main feature fires, the feature of largest fᵢcosᵢ has cos ≥ 0.025,
     x·u > 0, and that feature carries at least 40% of x·u.
   Per letter: the sum of each over its probe true positives, divided by their number; the
   scores are the means over letters.
"""
import numpy as np

from jumprelu import feature_acts, probes

LETTERS = "abcdefghijklmnopqrstuvwxyz"
TEMPLATE = "{word} has the first letter:"
# SAEBench's FeatureAbsorptionCalculator thresholds.
FULL_COS = 0.025  # top feature's cosine with the probe, full absorption
FRACTION_COS = 0.1  # each absorbing feature's cosine with the probe, absorption fraction
PROJECTION_SHARE = 0.4  # share of x·u the absorbing features must carry, both metrics
MAX_ABSORBING = 3  # features that may share the absorption, absorption fraction
EPS = 1e-8


def alpha_words(vocab: list[str]) -> list[tuple[int, str]]:
  """(token id, text) of every token made of ASCII letters alone, a leading space allowed."""
  out = []
  for i, s in enumerate(vocab):
    core = s[1:] if s.startswith(" ") else s
    if core and core.isascii() and core.isalpha():
      out.append((i, s))
  return out


def word_absorption(x_proj: float, f_F, cos_F, main: list[int]) -> tuple[float, bool]:
  """(absorption fraction, full absorption) of one word, from x·u (x_proj), its features
  f [F] and their decoder cosines with the probe cos [F] (module docstring, step 4)."""
  f_F, cos_F = np.asarray(f_F, np.float64), np.asarray(cos_F, np.float64)
  proj_F = f_F * cos_F
  main = list(main)
  main_proj = float(np.sum(proj_F[main]))
  others = np.ones(len(f_F), bool)
  others[main] = False
  others &= (cos_F >= FRACTION_COS) & (proj_F > 0)
  top = np.sort(proj_F[others])[::-1][:MAX_ABSORBING]
  absorbing = float(np.sum(top))
  if x_proj <= 0 or main_proj >= x_proj or absorbing / x_proj < PROJECTION_SHARE:
    fraction = 0.0
  elif main_proj <= 0.0:
    fraction = 1.0
  else:
    absorbed = min(absorbing, x_proj - main_proj)
    fraction = float(np.clip(absorbed / (absorbed + main_proj), 0.0, 1.0))
  first = int(np.argmax(proj_F))  # torch's topk(…)[0]: the largest projection
  full = (all(abs(f_F[i]) < EPS for i in main) and cos_F[first] >= FULL_COS and x_proj > 0
          and proj_F[first] / x_proj >= PROJECTION_SHARE)
  return fraction, bool(full)


def main_features(f_train, letter_train, f_test, letter_test, *, max_k: int = 10,
                  f1_jump: float = 0.03, l1: float = 0.01) -> dict[int, list[int]]:
  """Per letter index, its main (split) features (module docstring, step 3)."""
  Y = np.stack([letter_train == j for j in range(len(LETTERS))], axis=1)
  W = probes.l1_multi_probe(f_train, Y, l1=l1)
  out = {}
  for j in range(len(LETTERS)):
    if not Y[:, j].any():
      out[j] = []
      continue
    ranked = np.argsort(-W[j], kind="stable")
    best, feats = -np.inf, []
    for k in range(1, max_k + 1):
      idx = ranked[:k]
      w, b = probes.fit_logistic(f_train[:, idx], Y[:, j])
      score = probes.f1(probes.scores(w, b, f_test[:, idx]) > 0, letter_test == j)
      if score <= best + f1_jump:
        break
      best, feats = score, idx.tolist()
    out[j] = feats
  return out


def letter_probe(x_train, letter_train) -> tuple[np.ndarray, np.ndarray]:
  """The ground-truth probe: one-vs-rest logistic regressions (W [26, D], b [26])."""
  fits = [probes.fit_logistic(x_train, letter_train == j) for j in range(len(LETTERS))]
  return np.stack([w for w, _ in fits]), np.asarray([b for _, b in fits])


def absorption_scores(x_test, f_test, letter_test, probe_W, probe_b, W_dec_FxD,
                      main: dict[int, list[int]], letters=None) -> dict:
  """SAEBench's absorption metrics on the held-out words (module docstring, step 4), over
  the letter indices in `letters` (default: all)."""
  W_dec = np.asarray(W_dec_FxD, np.float64)
  dec_unit = W_dec / np.maximum(np.linalg.norm(W_dec, axis=1, keepdims=True), EPS)
  x_test = np.asarray(x_test, np.float64)
  per_letter = {}
  for j, letter in enumerate(LETTERS):
    if letters is not None and j not in letters:
      continue
    mine = np.flatnonzero((letter_test == j) & (x_test @ probe_W[j] + probe_b[j] > 0))
    if len(mine) == 0:
      continue
    u = probe_W[j] / np.linalg.norm(probe_W[j])
    cos_F = dec_unit @ u
    results = [word_absorption(float(x_test[i] @ u), f_test[i], cos_F, main[j]) for i in mine]
    per_letter[letter] = {
        "absorption_fraction": float(np.sum([r[0] for r in results]) / len(mine)),
        "full_absorption_rate": float(np.sum([r[1] for r in results]) / len(mine)),
        "probe_true_positives": int(len(mine)), "split_features": len(main[j])}
  mean = lambda key: float(np.mean([v[key] for v in per_letter.values()])) if per_letter \
      else float("nan")
  return {"mean_absorption_fraction": mean("absorption_fraction"),
          "mean_full_absorption_rate": mean("full_absorption_rate"),
          "mean_split_features": mean("split_features"), "letters": per_letter}


def prompt_tokens(tokenizer, cfg, words: list[tuple[int, str]], rng, n_icl: int = 4):
  """(tokens [N, L] padded, the word's position [N]): n_icl in-context lines of other words
  ("{word} has the first letter: {L}"), then TEMPLATE for the word, whose token is placed by id
  (so it is the vocabulary token itself, whatever the tokenizer would merge)."""
  encode = lambda s: tokenizer.encode(s, add_special_tokens=False).ids
  suffix = encode(TEMPLATE.format(word=""))  # " has the first letter:"
  bos = [cfg.bos_id] if cfg.bos_id is not None else []
  rows, pos = [], []
  for i, (tid, _) in enumerate(words):
    others = [words[j][1] for j in rng.choice(len(words), n_icl + 1, replace=False) if j != i]
    lines = "".join(TEMPLATE.format(word=w) + " " + w.strip()[0].upper() + "\n"
                    for w in others[:n_icl])
    prefix = bos + encode(lines)
    rows.append(prefix + [tid] + suffix)
    pos.append(len(prefix))
  tokens = np.full((len(rows), max(map(len, rows))), feature_acts.pad_id(cfg), np.int32)
  for i, r in enumerate(rows):
    tokens[i, :len(r)] = r
  return tokens, np.asarray(pos)


def evaluate(c, lm, sae, *, words_per_letter: int = 40, n_icl: int = 4,
             test_fraction: float = 0.25, max_k: int = 10, min_probe_f1: float = 0.6,
             seed: int = 0) -> dict:
  """SAEBench's absorption metrics of `sae` (feature_acts.load_sae's triple) at c's lm.site:
  up to words_per_letter words per letter, a test_fraction of them held out; letters whose
  ground-truth probe has held-out F1 below min_probe_f1 are left out (SAEBench's
  min_GT_probe_f1)."""
  tokenizer, cfg = lm[2], lm[1]
  vocab = feature_acts.token_strings(tokenizer, range(tokenizer.get_vocab_size()))
  rng = np.random.default_rng(seed)
  alpha, words = alpha_words(vocab), []
  for letter in LETTERS:
    mine = [w for w in alpha if w[1].strip()[0].lower() == letter]
    words += [mine[i] for i in rng.permutation(len(mine))[:words_per_letter]]
  letter_N = np.asarray([LETTERS.index(w.strip()[0].lower()) for _, w in words])
  tokens, pos_N = prompt_tokens(tokenizer, cfg, words, rng, n_icl)
  x_N, f_N = [], []
  for rows, x, f, _ in feature_acts.site_and_features(c, lm, sae, tokens):
    x_N.append(x[np.arange(len(rows)), pos_N[rows]])
    f_N.append(f[np.arange(len(rows)), pos_N[rows]])
  x_N, f_N = np.concatenate(x_N), np.concatenate(f_N)
  order = rng.permutation(len(words))
  n_test = int(round(len(words) * test_fraction))
  test, train = order[:n_test], order[n_test:]
  probe_W, probe_b = letter_probe(x_N[train], letter_N[train])
  probe_f1 = {j: probes.f1(x_N[test] @ probe_W[j] + probe_b[j] > 0, letter_N[test] == j)
              for j in range(len(LETTERS))}
  good = {j for j, v in probe_f1.items() if v >= min_probe_f1}
  main = main_features(f_N[train], letter_N[train], f_N[test], letter_N[test], max_k=max_k)
  out = absorption_scores(x_N[test], f_N[test], letter_N[test], probe_W, probe_b,
                          sae[2]["W_dec"], main, letters=good)
  return {**out, "words": len(words), "test_words": int(n_test),
          "letters_scored": len(out["letters"]),
          "probe_f1": {LETTERS[j]: v for j, v in probe_f1.items()}}
