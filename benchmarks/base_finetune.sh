#!/usr/bin/env bash
# Fine-tuning adds conditions to a pretrained base without breaking it, measured on the CPU.
#
#   bash benchmarks/base_finetune.sh OUT_ROOT
#
# 1. base       benchmarks/tiny_latent_base.py: a tiny SD-format latent model trained here on the
#               synthetic set with captions only, the "pretrained" base (scenes of seed 1)
# 2. synth      2000 new scenes at 64 px (seed 0): the fine-tuning and evaluation data
# 3. decompose  with --base: the base VAE's latents, its text encoder's caption embeddings and
#               every condition that needs no downloaded weights (semantics needs CLIP: skipped)
# 4. train      base: the untouched base as a ComposerPipeline; full; adapter (+ LoRA rank 8);
#               full again at the lower learning rates FULL_LRS (default "5e-5 1e-4")
# 5. evaluate   each: condition fidelity against the unconditional floor, and the synthetic
#               compositional benchmark (caption-only colour / shape accuracy)
# 6. summary    the three evaluations' key figures as one markdown table (stdout, OUT_ROOT/summary.md)
#
# A step whose output exists is skipped, and every step resumes where it was killed: run the same
# command again. Each step logs to OUT_ROOT/<step>.log. In the background:
#   nohup bash benchmarks/base_finetune.sh runs/base-finetune > runs/base-finetune.log 2>&1 &
set -euo pipefail

if [[ $# -ne 1 ]]; then
  echo "usage: $0 OUT_ROOT" >&2
  exit 2
fi
OUT=$(realpath -m "$1")
cd "$(dirname "$0")/.."
if [[ -x .venv/bin/recompose ]]; then
  PATH="$PWD/.venv/bin:$PATH"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 # every weight is local: nothing is downloaded
CONFIG=benchmarks/train-base-finetune.yaml
# Captions per side (seen / held-out pairs) of the compositional benchmark. At 32 (the rows'
# count) one accuracy's sampling error is about ±0.06, more than the 0.05 margin judged here.
BENCH_CAPTIONS=${BENCH_CAPTIONS:-128}
# Extra options of benchmarks/tiny_latent_base.py (e.g. "--unet-steps 12000" for a shorter base).
read -r -a BASE_ARGS <<<"${BASE_ARGS:-}"
mkdir -p "$OUT"

step() { # step NAME DONE COMMAND...: COMMAND, logged to $OUT/NAME.log, unless the file DONE exists
  local name=$1 done=$2 t0=$SECONDS
  shift 2
  if [[ -e $done ]]; then
    echo "[$name] done already: $done"
    return 0
  fi
  echo "[$name] $(date '+%F %T') started, log $OUT/$name.log"
  if ! "$@" >>"$OUT/$name.log" 2>&1; then
    echo "[$name] failed; the end of $OUT/$name.log:" >&2
    tail -n 20 "$OUT/$name.log" >&2
    exit 1
  fi
  echo "[$name] $(date '+%F %T') done in $(((SECONDS - t0) / 60)) min"
}

train() { # train NAME ARGS...: recompose train on the base into $OUT/train-NAME
  local name=$1
  shift
  step "train-$name" "$OUT/train-$name/export/model_index.json" \
    recompose train --data "$OUT/decomposed" --base "$OUT/base" --output "$OUT/train-$name" \
    --config "$CONFIG" "$@"
}

evaluate() { # evaluate NAME: the export of train-NAME into $OUT/eval-NAME
  step "eval-$1" "$OUT/eval-$1/evaluate.json" \
    recompose evaluate --model "$OUT/train-$1/export" --data "$OUT/decomposed" --output "$OUT/eval-$1" \
    --num-samples 32 --set benchmark.num_captions="$BENCH_CAPTIONS"
}

step base "$OUT/base/build/samples.json" python benchmarks/tiny_latent_base.py --output "$OUT/base" "${BASE_ARGS[@]}"
step synth "$OUT/synth/synth.json" recompose synth --output "$OUT/synth" --count 2000 --seed 0 --resolution 64
step decompose "$OUT/decomposed/manifest.json" \
  recompose decompose --input "$OUT/synth" --output "$OUT/decomposed" --base "$OUT/base" \
  --config configs/decompose-laptop.yaml --resolution 64

# The base itself as a ComposerPipeline, evaluated by the same code as the fine-tunes: one
# adapter-mode step that moves no weight. The adapter mode freezes the base UNet; the new
# condition paths start at exactly zero (models/backbone.py); the warm-up gives the one step
# lr × 0/100 = 0 (and lr is 1e-30 besides: the config takes only lr > 0); no EMA. So the export
# holds the base's weights unchanged, and its output is the base's for any conditions.
train base --mode adapter --max-steps 1 --set optim.lr=1e-30 --set optim.ema_decay=null
evaluate base
train full --mode full
evaluate full
train adapter --mode adapter --set lora_rank=8 --set optim.lr=1e-3
evaluate adapter
# Full mode again at lower learning rates (FULL_LRS, "" for none): how much of the base's caption
# accuracy a smaller step keeps, and how much less of the conditions it learns.
read -r -a FULL_LRS <<<"${FULL_LRS-5e-5 1e-4}"
for lr in "${FULL_LRS[@]}"; do
  train "full-lr$lr" --mode full --set optim.lr="$lr"
  evaluate "full-lr$lr"
done

python - "$OUT" "${FULL_LRS[@]}" <<'EOF' | tee "$OUT/summary.md"
"""The evaluations' quality bars and caption-only accuracies, one row per model."""
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
models = {"base (step 0)": "base", "full (lr 2e-4)": "full", "adapter + LoRA 8 (lr 1e-3)": "adapter"}
models.update({f"full (lr {x})": f"full-lr{x}" for x in sys.argv[2:]})
evals = {k: json.loads((out / f"eval-{v}" / "evaluate.json").read_text()) for k, v in models.items()}
conds = ("palette", "sketch", "instances", "depth", "intensity")
bench = [(m, side) for side in ("seen", "heldout") for m in ("colour", "shape")]
MARGIN = 0.05  # caption-only accuracy may fall by at most this much from the base's


def fmt(v):
    return "–" if v is None else f"{v:.3f}"


def bar(e, cond):
    row = next((b for b in e["quality_bar"] if b["condition"] == cond), None)
    if row is None or row["ratio"] is None:
        return "–"
    return f"{row['ratio']:.2f}× {'✅' if row['pass'] else '❌'}"


first = evals["base (step 0)"]
targets = {b["condition"]: f"{b['metric']} {b['target']}" for b in first["quality_bar"]}
header = ["model", *(targets.get(c, c) for c in conds), "mask exact"]
header += [f"caption-only {m} ({side})" for m, side in bench] + [f"≥ base − {MARGIN}"]
print("| " + " | ".join(header) + " |")
print("|" + "---|" * len(header))
base = first["metrics"]
for name, e in evals.items():
    mask = [b["pass"] for b in e["quality_bar"] if b["condition"].startswith("mask")]
    acc = [e["metrics"].get(f"caption/{side}/{m}") for m, side in bench]
    ok = all(a is not None and a >= base[f"caption/{side}/{m}"] - MARGIN for a, (m, side) in zip(acc, bench))
    cells = [bar(e, c) for c in conds] + ["✅" if mask and all(mask) else "❌"]
    cells += [fmt(a) for a in acc] + ["✅" if ok else "❌"]
    print("| " + " | ".join([name, *cells]) + " |")
for label, source in (("base, unconditional (floor)", "none"), ("renders (the parser's ceiling)", "real")):
    cells = ["–"] * (len(conds) + 1) + [fmt(base.get(f"{source}/{side}/{m}")) for m, side in bench] + [""]
    print("| " + " | ".join([label, *cells]) + " |")
vae = json.loads((out / "base" / "build" / "vae.json").read_text())
n = evals["base (step 0)"]["num_rows"]
print(
    f"\nFidelity: each condition alone, ratio to the unconditional floor ({n} rows); "
    f"caption-only: the benchmark's per-object accuracy (guidance {first['config']['benchmark']['guidance']}). "
    f"Base VAE: held-out PSNR {vae['heldout_psnr_db']:.1f} dB, scaling factor {vae['scaling_factor']:.3f}."
)
EOF
