#!/usr/bin/env bash
# The SmolLM2-135M reproduction of docs/reproduction.md, end to end, on 2 CPU cores:
#   1. corpus: the Python documentation Debian ships (apt-get install python3.11-doc), cut
#      into documents and shuffled (scripts/corpus.py);
#   2. the headline: JumpReLU, TopK, BatchTopK and Gated, three sparsities each (one vmapped
#      ensemble per architecture, configs/smollm2_sweep.py), for seeds 0, 1 and 2; the first run
#      harvests 400k activations at resid_post.14 into the store every other run reads;
#   3. every other objective and option once (seed 0): configs/smollm2_sweep.py's VARIANTS;
#   4. every SAE scored with it spliced into the LM on the same 64 held-out contexts
#      (scripts/evaluate_runs.py, the clean LM runs shared);
#   5. the tables with intervals and the plots with error bars (scripts/compare.py).
# Every step resumes from what is on disk: rerun the script after an interruption.
#   bash scripts/reproduce.sh [OUT=runs/repro] [DOCS=docs]
# writes DOCS/reproduction_results.md and DOCS/figures/.
set -euo pipefail
OUT=${1:-runs/repro}
DOCS=${2:-docs}
cd "$(dirname "$0")/.."
start=$(date +%s)

[ -f "$OUT/corpus.jsonl" ] || python scripts/corpus.py --out "$OUT/corpus.jsonl"

train() {  # train RUN SEED
  python experiments/train.py --config="configs/smollm2_sweep.py:$1" --config.seed="$2" \
    --config.text.path="$OUT/corpus.jsonl" --config.data.path="$OUT/store" \
    --config.eval.num_contexts=0 --config.log.progress=False --workdir="$OUT/runs/$1_s$2"
}

for seed in 0 1 2; do
  for arch in jumprelu topk batchtopk gated; do
    train "$arch" "$seed"
  done
done
for variant in $(python -c "from configs import smollm2_sweep; print(*smollm2_sweep.VARIANTS)"); do
  train "$variant" 0
done

python scripts/evaluate_runs.py --num_contexts 64 "$OUT"/runs/*
python scripts/compare.py --runs "$OUT/runs" --out "$DOCS/reproduction_results.md" \
  --figures "$DOCS/figures"
echo "reproduce.sh: $(( ($(date +%s) - start) / 60 )) min"
