#!/usr/bin/env bash
# Nsight Compute on the Gluon int4 GEMM probe's --once target (issue 10): speed of light, occupancy, scheduler and the
# stall reasons per issued instruction, for two Gluon configs and torch.mm on one 7B projection. Output in $OUT/ncu.txt,
# the key lines printed.   [PROBE=module] bash tools/ncu_gluon.sh [SHAPE:TOKENS] [probe flags...]   (after the wheels are
# installed; PROBE: bench.probes.gluon_int4_gemm (the default) or bench.probes.gluon_int4_gemm_smem, whose --once runs
# every config). SOURCE_SKIP=N instead samples the stalls per SASS instruction of the N-th launch (0-based) into
# $OUT/source.csv and prints the 25 most stalled
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
target=${1:-gate_up:512}; shift || true
stalls=""
for s in barrier long_scoreboard wait math_pipe_throttle short_scoreboard mio_throttle lg_throttle membar \
         dispatch_stall selected not_selected no_instruction sleeping misc drain branch_resolving; do
  stalls+="smsp__average_warps_issue_stalled_${s}_per_issue_active.ratio,"
done
if [ -z "${SOURCE_SKIP:-}" ]; then
  timeout 240 ncu --clock-control none --kernel-name regex:'gluon|nvjet|gemm|sm90|cutlass' --section SpeedOfLight \
    --section WarpStateStats --section SchedulerStats --section Occupancy --section MemoryWorkloadAnalysis \
    --metrics "${stalls}sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active" \
    python3 -m "${PROBE:-bench.probes.gluon_int4_gemm}" --once "$target" "$@" > "$OUT/ncu.txt" 2> "$OUT/ncu.err"
  echo "ncu: rc=$? $(tail -2 "$OUT/ncu.err")"
  grep -E "^  [a-zA-Z_0-9]+.*\(|Duration|Compute \(SM\) Throughput|Memory Throughput|L2 Cache Throughput|Issue Slots Busy|\
No Eligible|Achieved Occupancy|Registers Per|stalled_[a-z_]*per_issue|gmma|Warp Cycles Per Issued|Theoretical Occ" \
    "$OUT/ncu.txt" | sed 's/smsp__average_warps_issue_stalled_//; s/_per_issue_active.ratio//'
fi
if [ -n "${SOURCE_SKIP:-}" ]; then  # per-instruction stall samples of one launch (the SOURCE_SKIP-th kernel, 0-based)
  timeout 200 ncu --clock-control none --kernel-name regex:'gluon|gemm' --launch-skip "$SOURCE_SKIP" --launch-count 1 \
    --section SourceCounters --section WarpStateStats -o "$OUT/source" -f \
    python3 -m "${PROBE:-bench.probes.gluon_int4_gemm}" --once "$target" "$@" > "$OUT/source.log" 2>&1
  echo "ncu source: rc=$?"
  ncu -i "$OUT/source.ncu-rep" --page source --csv --print-source sass > "$OUT/source.csv" 2>> "$OUT/source.log"
  python3 - "$OUT/source.csv" <<'PY'
import csv, sys
lines = open(sys.argv[1]).read().splitlines()  # a "Kernel Name" line comes before the header
rows = list(csv.DictReader(lines[next((i for i, l in enumerate(lines) if l.startswith('"Address"')), 0):]))
num = lambda v: float((v or "0").replace(",", "") or 0)
key = next((k for k in rows[0] if k.startswith("Warp Stall Sampling (All")), None) if rows else None
if key:
    top = sorted(rows, key=lambda r: -num(r[key]))[:25]
    total = sum(num(r[key]) for r in rows) or 1.0
    for r in top:
        print(f"{num(r[key]) / total:6.1%}  {r.get('Address', '')}  {r.get('Source', '')[:90]}")
else:
    print("no stall-sampling column:", list(rows[0])[:12] if rows else "no rows")
PY
fi
