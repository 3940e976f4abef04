#!/usr/bin/env bash
# Device call (issue 10, the Gluon shared-memory int4 GEMM probe): every config's --check, the sweep at 128/256/512
# tokens, then per-SASS-instruction stall samples (tools/ncu_gluon.sh SOURCE_SKIP) of two launches of --once
# gate_up:512: launch 3 = config 1's second run (128x128x64, 4 stages, 8 warps, scales one step ahead in registers),
# launch 23 = config 11's (256 tokens on 16 warps, two lanes a group). Everything is built with ptxas 13.4
# (carried xz-compressed in .ptxas/: Triton 3.6's own ptxas segfaults on SCALES 3 and 0). Logs under $OUT.
#   bash tools/smem_session.sh   (after the wheels are installed; carry .ptxas)
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source tools/use_ptxas13.sh
P=bench.probes.gluon_int4_gemm_smem
timeout 150 python3 -m $P --check > "$OUT/smem_check.log" 2>&1; echo "check rc=$?"; grep -v " 0 | - | - |$" "$OUT/smem_check.log" | tail -12
timeout 240 python3 -m $P --tokens 128,256,512 > "$OUT/smem_sweep.log" 2>&1; echo "sweep rc=$?"
for skip in 3 23; do
  mkdir -p "$OUT/src$skip"
  OUT="$OUT/src$skip" PROBE=$P SOURCE_SKIP=$skip timeout 150 bash tools/ncu_gluon.sh gate_up:512 > "$OUT/src$skip.txt" 2>&1
  echo "source $skip rc=$?"; head -14 "$OUT/src$skip.txt"
done
cut -d'|' -f1-9 "$OUT/smem_sweep.log"
