#!/usr/bin/env bash
# Trains and evaluates several variants of the GPU config (configs/smollm2.yaml) side by side on one
# GPU, to choose between training settings in one device call: SmolLM2-135M is far too small to fill
# an H200 (a training step is bound by kernel launches), so a few runs share it at little cost each.
# Timings printed by runs that shared the GPU are not speed measurements; rerun the chosen config
# alone with scripts/smollm2_gpu_check.sh for the report.
#   scripts/smollm2_gpu_variants.sh NAME="--key=value --key=value" [NAME="..." ...]
# Environment: OUT (results: $OUT/variants/NAME/<timestamp>/), MAX_TRAIN_S (per run, default 300),
# SAMPLES (eval examples per task, default 5), MODES (default "fa flux"), LENGTHS (eval prompt
# lengths, default 4096), CONFIG (default configs/smollm2.yaml).
# The model and Python packages are found or staged by scripts/smollm2_stage.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/flux-smollm2}
PY=${PY:-python3}
[ $# -ge 1 ] || { echo "usage: $0 NAME=\"overrides\" [NAME=\"overrides\" ...]"; exit 2; }
for spec in "$@"; do
  case $spec in *=*) ;; *) echo "variant '$spec': expected NAME=\"--section.key=value ...\""; exit 2 ;; esac
done
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# Stage the model and packages once, before the runs start (they would race on the join).
source scripts/smollm2_stage.sh

# Each run gets an equal share of the CPU threads.
threads=$(( $(nproc) / $# )); [ $threads -ge 1 ] || threads=1
pids=()
for spec in "$@"; do
  name=${spec%%=*}; overrides=${spec#*=}
  mkdir -p "$OUT/variants/$name"
  # shellcheck disable=SC2086  # the overrides are words on purpose
  OMP_NUM_THREADS=$threads $PY -m flux_attention.eval.demo --config "${CONFIG:-configs/smollm2.yaml}" \
    --out "$OUT/variants/$name" --max-train-s "${MAX_TRAIN_S:-300}" --lengths ${LENGTHS:-4096} \
    --samples "${SAMPLES:-5}" --modes ${MODES:-fa flux} --speed-lengths \
    "--model.name=$model" "${tb[@]}" $overrides \
    > "$OUT/variants/$name/log.txt" 2>&1 &
  pids+=($!)
  echo "started $name (pid $!): $overrides"
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=1; done

$PY - "$OUT/variants" <<'EOF'
import glob, json, os, sys
root = sys.argv[1]
print(f"\n{'variant':<14} {'ret tok.acc FA/Flux':>20} {'ret match FA/Flux':>18} {'kv_ret FA/Flux':>15} "
      f"{'SA ret/hol/all':>16} {'ppl FA/Flux':>13}")
for path in sorted(glob.glob(os.path.join(root, "*", "*", "results.json"))):
    d = json.load(open(path))
    g, o, t = d["groups"], d["overall"], d["tasks"]
    name = path.split(os.sep)[-3]
    r, h = g["retrieval"], g["holistic"]
    fa = lambda x: f"{100 * x:.1f}"  # noqa: E731
    print(f"{name:<14} {fa(r['fa']['token_acc']):>10}/{fa(r['flux']['token_acc']):<9} "
          f"{fa(r['fa']['match']):>9}/{fa(r['flux']['match']):<8} "
          f"{fa(t['kv_retrieval']['fa']['token_acc']):>7}/{fa(t['kv_retrieval']['flux']['token_acc']):<7} "
          f"{fa(r['flux']['sa_fraction']):>5}/{fa(h['flux']['sa_fraction'])}/{fa(o['flux']['sa_fraction']):<5} "
          f"{o['fa']['ppl']:.2f}/{o['flux']['ppl']:.2f}")
EOF
for spec in "$@"; do name=${spec%%=*}; echo "--- $name"; tail -n 4 "$OUT/variants/$name/log.txt"; done
exit $rc
