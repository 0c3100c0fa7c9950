#!/usr/bin/env bash
# The SmolLM2-135M comparison of docs/reproduction.md, end to end (about an hour on 2 CPU cores):
# for layers 14 and 22 (residual stream), one sweep per architecture (JumpReLU, ReLU, Gated,
# TopK; four sparsities each, configs/smollm2_sweep.py) trained as one ensemble and evaluated
# with each SAE spliced into the LM; JumpReLU's ε sweep at layer 14; then the tables and plots.
# Every step resumes from what is on disk: rerun the script after an interruption.
#   bash scripts/reproduce.sh [OUT=runs/repro] [DOCS=docs]
# writes DOCS/reproduction_results.md (the tables) and DOCS/figures/ (the plots).
set -euo pipefail
OUT=${1:-runs/repro}
DOCS=${2:-docs}
cd "$(dirname "$0")/.."

train() {  # train LAYER SWEEP
  python experiments/train.py --config="configs/smollm2_sweep.py:$2" \
    --config.lm.site="resid_post.$1" --config.data.path="$OUT/store_resid_post.$1" \
    --config.log.progress=False --workdir="$OUT/l$1/$2"
}

for layer in 14 22; do
  for sweep in jumprelu relu gated topk; do
    train "$layer" "$sweep"
  done
done
train 14 eps

python scripts/report.py --runs "$OUT"/l14/* "$OUT"/l22/* --out "$DOCS/reproduction_results.md"
python scripts/plots.py --runs "$OUT"/l14/* "$OUT"/l22/* --out "$DOCS/figures"
