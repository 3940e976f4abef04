set -u
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD HYBRIDRT_TEST_TOKENIZER=$PWD/.gpu/tokenizer
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_rope_in_attention.py tests/test_pending_residual.py tests/test_executor_argmax.py > $OUT/t.log 2>&1
echo "tests rc=$? $(tail -1 $OUT/t.log)"; grep -E "^FAILED|Error" $OUT/t.log | head -5
timeout 100 python3 -m bench.probes.step_variants --models smollm2-135m --contexts 300,2000 --rounds 7 \
  --variants "kve=0;kve=1;kve=0;kve=1" > $OUT/sv4096.md 2>&1; echo "sv 4096 rc=$?"; cat $OUT/sv4096.md
timeout 80 python3 -m bench.probes.step_variants --models smollm2-135m --contexts 50,300 --rounds 7 --max-context 512 \
  --variants "kve=0;kve=1;kve=0;kve=1" > $OUT/sv512.md 2>&1; echo "sv 512 rc=$?"; tail -9 $OUT/sv512.md
for mc in 512 4096; do for i in 1 2; do for t in base new; do d=$PWD; [ $t = base ] && d=$PWD/.ab_base
  (cd "$d" && PYTHONPATH=/tmp/site:$d timeout 100 python3 -m launch.cli bench --quiet --model dummy:smollm2-135m \
    --engines hybridrt,hybridrt-executor --workloads decode --max-context $mc --out "$OUT/s_${mc}_${t}_$i" > "$OUT/s_${mc}_${t}_$i.log" 2>&1)
  echo "ctx $mc $t $i: rc=$? $(grep -E '^\| hybridrt' "$OUT/s_${mc}_${t}_$i.log" | head -2 | cut -d'|' -f2,3,5,7 | tr '\n' ' ')"
done; done; done
(cd "$OUT" && tar czf /tmp/r.tgz . && find . -mindepth 1 -delete && mv /tmp/r.tgz .)
