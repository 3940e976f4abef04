#!/usr/bin/env bash
# Nsight Compute on the Gluon int4 GEMM probe's --once target (issue 10): speed of light, occupancy, scheduler and the
# stall reasons per issued instruction, for two Gluon configs and torch.mm on one 7B projection. Output in $OUT/ncu.txt,
# the key lines printed.   bash tools/ncu_gluon.sh [SHAPE:TOKENS] [probe flags...]   (after the wheels are installed)
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
target=${1:-gate_up:512}; shift || true
stalls=""
for s in barrier long_scoreboard wait math_pipe_throttle short_scoreboard mio_throttle lg_throttle membar \
         dispatch_stall selected not_selected no_instruction sleeping misc drain branch_resolving; do
  stalls+="smsp__average_warps_issue_stalled_${s}_per_issue_active.ratio,"
done
timeout 240 ncu --clock-control none --kernel-name regex:'gluon|nvjet|gemm|sm90|cutlass' --section SpeedOfLight \
  --section WarpStateStats --section SchedulerStats --section Occupancy --section MemoryWorkloadAnalysis \
  --metrics "${stalls}sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active" \
  python3 -m bench.probes.gluon_int4_gemm --once "$target" "$@" > "$OUT/ncu.txt" 2> "$OUT/ncu.err"
echo "ncu: rc=$? $(tail -2 "$OUT/ncu.err")"
grep -E "^  [a-zA-Z_0-9]+.*\(|Duration|Compute \(SM\) Throughput|Memory Throughput|L2 Cache Throughput|Issue Slots Busy|\
No Eligible|Achieved Occupancy|Registers Per|stalled_[a-z_]*per_issue|gmma|Warp Cycles Per Issued|Theoretical Occ" \
  "$OUT/ncu.txt" | sed 's/smsp__average_warps_issue_stalled_//; s/_per_issue_active.ratio//'
