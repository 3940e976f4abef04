#!/usr/bin/env bash
# Device call: bench.probes.stream_int4, one process per stream config (a fault in one config leaves the others'
# rows), logs under $OUT/stream/. Usage: bash tools/stream_sweep.sh [--bits 8] (extra args go to every run).
set -u
mkdir -p "$OUT/stream"
CONFIGS=${CONFIGS:-32x128x4x3 32x64x4x4 16x128x4x4 64x64x4x3 64x64x8x3 128x32x4x3 16x256x4x3 8x256x4x4 64x32x4x4 128x32x8x3}
for c in $CONFIGS; do
  timeout 120 python3 -m bench.probes.stream_int4 --check --configs "$c" "$@" > "$OUT/stream/$c.md" 2> "$OUT/stream/$c.err"
  echo "$c rc=$?" | tee -a "$OUT/stream/rc.txt"
done
echo "| projection | kernel | ms | TB/s | vs shipped | rel err (2-norm) vs shipped | vs float64 |"
cat "$OUT"/stream/*.md | grep '^| ' | grep -v 'projection\|---' | sort -t'|' -k2,2 -k6,6 | awk -F'|' '!(seen[$2 $3]++)'
grep -h "Error\|error" "$OUT"/stream/*.err | sort | uniq -c | head -20
