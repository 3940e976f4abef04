#!/usr/bin/env bash
# Device call (issue 10): the warp-specialized int4 GEMM probe (bench.probes.gluon_int4_gemm_ws): --check of every
# config (a hang is killed at 90 s), then the sweep at 128/256/512 tokens; built with ptxas 13.4 as
# tools/smem_session.sh does (carry .ptxas). Logs under $OUT.   bash tools/ws_session.sh
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source tools/use_ptxas13.sh
P=bench.probes.gluon_int4_gemm_ws
timeout 90 python3 -m $P --check > "$OUT/ws_check.log" 2>&1; rc=$?; echo "check rc=$rc"; tail -12 "$OUT/ws_check.log"
if [ $rc -eq 0 ]; then
  timeout 240 python3 -m $P --tokens 128,256,512 > "$OUT/ws_sweep.log" 2>&1; echo "sweep rc=$?"
  cut -d'|' -f1-10 "$OUT/ws_sweep.log"
fi
