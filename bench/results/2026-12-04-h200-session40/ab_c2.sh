set -u
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD HYBRIDRT_TEST_TOKENIZER=$PWD/.gpu/tokenizer
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_executor_argmax.py tests/test_gpu_path.py -k "graph_runner or serve_on_gpu or idle_captures or replay_matches" > $OUT/t2.log 2>&1
echo "tests rc=$? $(tail -1 $OUT/t2.log)"; grep -E "^FAILED|Error" $OUT/t2.log | head -5
for i in 1 2; do for t in base new; do d=$PWD; [ $t = base ] && d=$PWD/.ab_base
  (cd "$d" && PYTHONPATH=/tmp/site:$d timeout 150 python3 -m launch.cli bench --quiet --model dummy:llama-2-7b \
    --engines hybridrt,hybridrt-executor --workloads decode --max-context 512 --out "$OUT/b7_${t}_$i" > "$OUT/b7_${t}_$i.log" 2>&1)
  echo "7b $t $i: rc=$? $(grep -E '^\| hybridrt' "$OUT/b7_${t}_$i.log" | head -2 | cut -d'|' -f2,3,4,5,7 | tr '\n' ' ')"
  [ $i = 1 ] && [ $t = new ] && grep -E "^\| hybridrt .*ok" "$OUT/b7_${t}_$i/results.md" | head -2
done; done
(cd "$OUT" && tar czf /tmp/r.tgz . && find . -mindepth 1 -delete && mv /tmp/r.tgz .)
