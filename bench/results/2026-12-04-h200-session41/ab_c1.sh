set -u
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD HYBRIDRT_TEST_TOKENIZER=$PWD/.gpu/tokenizer
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_pending_residual.py tests/test_gemv_dense_splitk.py tests/test_early_weights.py tests/test_kernels.py > $OUT/t1.log 2>&1
echo "tests rc=$? $(tail -1 $OUT/t1.log)"; grep -E "^FAILED|Error" $OUT/t1.log | head -5
timeout 120 python3 -m bench.probes.step_variants --models smollm2-135m --contexts 300,2000 --rounds 5 \
  --variants "fused=1;split=128;split=128,warps=8;split=256,warps=8;split=32,warps=2;split=32,warps=4;fused=1" > $OUT/sv.md 2>&1; echo "sv rc=$?"; cat $OUT/sv.md
for i in 1 2; do for t in base new; do d=$PWD; [ $t = base ] && d=$PWD/.ab_base
  (cd "$d" && PYTHONPATH=/tmp/site:$d timeout 150 python3 -m launch.cli bench --quiet --model dummy:llama-2-7b \
    --engines hybridrt,hybridrt-executor --workloads decode --max-context 512 --out "$OUT/b7_${t}_$i" > "$OUT/b7_${t}_$i.log" 2>&1)
  echo "7b $t $i: rc=$? $(grep -E '^\| hybridrt' "$OUT/b7_${t}_$i.log" | head -2 | cut -d'|' -f2,3,4,5,7 | tr '\n' ' ')"
done; done
(cd "$OUT" && tar czf /tmp/r.tgz . && find . -mindepth 1 -delete && mv /tmp/r.tgz .)
