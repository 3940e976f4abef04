set -u
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD HYBRIDRT_TEST_TOKENIZER=$PWD/.gpu/tokenizer
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_argmax.py tests/test_executor_argmax.py tests/test_gpu_path.py > $OUT/t1.log 2>&1
echo "tests rc=$? $(tail -1 $OUT/t1.log)"; grep -E "FAIL|Error" $OUT/t1.log | head -5
timeout 100 python3 -m bench.probes.step_variants --models smollm2-135m --contexts 300,2000 --variants "fused=1;ablate=4;ablate=1;ablate=5" --rounds 5 > $OUT/sv.md 2>&1; echo "sv rc=$?"; cat $OUT/sv.md
rm -rf /tmp/off && mkdir /tmp/off && cp -r graph_executor jit_context ipc launch bench hybridrt /tmp/off/
sed -i 's/self.argmax_graphs = (ARGMAX_GRAPH,) if model.tp is None else ()/self.argmax_graphs = ()/' /tmp/off/graph_executor/graphs.py
echo "off patched: $(grep -c 'self.argmax_graphs = ()$' /tmp/off/graph_executor/graphs.py)"
for i in 1 2 3; do for t in off on; do d=$PWD; [ $t = off ] && d=/tmp/off
  (cd "$d" && PYTHONPATH=/tmp/site:$d timeout 100 python3 -m launch.cli bench --quiet --model dummy:smollm2-135m \
    --engines hybridrt,hybridrt-executor --workloads decode --max-context 512 --out "$OUT/ag_${t}_$i" > "$OUT/ag_${t}_$i.log" 2>&1)
  echo "$t $i: $(grep -E '^\| hybridrt' "$OUT/ag_${t}_$i.log" | head -2 | cut -d'|' -f2,3,5,7 | tr '\n' ' ')"
done; done
(cd "$OUT" && tar czf /tmp/r.tgz . && find . -mindepth 1 -delete && mv /tmp/r.tgz .)
