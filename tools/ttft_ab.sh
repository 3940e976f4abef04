#!/usr/bin/env bash
# Device call: the executor's TTFT of two trees on one machine, alternating (issue 12's same-run A/B; the 36th
# session's ttft_ab/). The base tree is an export of a commit in .ab_base (ignored through .git/info/exclude;
# carry it with .whl):
#   rm -rf .ab_base && mkdir .ab_base && git archive <commit> | tar -x -C .ab_base && rm -rf .ab_base/bench/results
#   run: bash tools/ttft_ab.sh [rounds] [prompt lengths]      (~25 s a bench on the 7B)
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
ROUNDS=${1:-2}; LENS=${2:-10,25,50,100,200,300,400,500}
R=$PWD
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl > /dev/null 2>&1
rows() {  # the prompt-length rows of the K-th TTFT table (1: back to back, 2: after a pause) of run folder $2
  awk -v k="$1" '/^## TTFT/{n++} n==k' "$2/results.md" | grep '^| [0-9]' | cut -d'|' -f2,4 | tr '\n' ' '
}
for i in $(seq "$ROUNDS"); do
  for t in base new; do
    if [ "$t" = base ]; then cd "$R/.ab_base" || exit 2; else cd "$R" || exit 2; fi
    PYTHONPATH=/tmp/site:$PWD timeout 220 python3 -m launch.cli bench --quiet --engines hybridrt-executor \
      --workloads ttft,floors --prompt-lens "$LENS" --out "$OUT/$t$i" > "$OUT/$t$i.log" 2>&1
    rc=$?
    echo "$t$i rc=$rc back to back: $(rows 1 "$OUT/$t$i")  after a pause: $(rows 2 "$OUT/$t$i")"
  done
done
cd "$R" || exit 2
(cd "$OUT" && tar czf /tmp/ab.tgz . && find . -mindepth 1 -delete && mv /tmp/ab.tgz .)
