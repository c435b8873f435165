#!/usr/bin/env bash
# Compiles (ahead of time, for TPU, on this host) every row of README's memory table and keeps each
# `python -m train.compile` JSON line under benchmarks/results/aot/. Full depth: minutes per row on 2 cores.
# Usage: benchmarks/aot_memory_table.sh [ROW_FILTER_REGEX]
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=benchmarks/results/aot
mkdir -p "$OUT"
rows=(
  "train stage6_long_video v5p-128"
  "train stage7_million v5p-128"
  "train stage7_million v6e-128"
  "train stage7_million v5p-64"
  "train stage5_long_video_tuning v5p-128"
  "train stage4_instruction v5p-128"
  "infer 64 v5e-8"
  "infer 160 v5e-8"
  "infer 64 v6e-8"
  "infer 160 v6e-8"
  "train stage5_long_video_tuning v6e-256"
  "train stage6_long_video v6e-256"
  "train stage4_instruction v6e-128"
  "train stage1_image_pretrain v6e-64"
  "train stage2_video_pretrain v6e-64"
  "train stage3_refinement v6e-64"
  "train stage1_image_pretrain v5p-128"
  "train stage2_video_pretrain v5p-128"
  "train stage3_refinement v5p-128"
  "train stage3_refinement v6e-128"
  "train stage6_long_video v6e-128"
  "train stage5_long_video_tuning v5e-256"
  "train stage6_long_video v5e-256"
  "train stage4_instruction v6e-64"
  "train stage5_long_video_tuning v6e-64"
)
FILTER=${1:-}
for row in "${rows[@]}"; do
  [[ -n "$FILTER" && ! "$row" =~ $FILTER ]] && continue
  read -r kind what topo <<< "$row"
  if [[ $kind == train ]]; then
    name="$what.$topo"
    cmd=("$PY" -m train.compile --config "configs/$what.py" --topology "$topo")
  else
    name="inference_${what}frames.$topo"
    cmd=("$PY" -m train.compile --inference --frames "$what" --topology "$topo" --mesh tensor=-1)
  fi
  echo "== $name: ${cmd[*]}" >&2
  JAX_PLATFORMS=cpu timeout 3000 "${cmd[@]}" > "$OUT/$name.json.tmp" 2> "$OUT/$name.log" \
    && mv "$OUT/$name.json.tmp" "$OUT/$name.json" || echo "   failed: see $OUT/$name.log" >&2
  rm -f "$OUT/$name.json.tmp"
done
