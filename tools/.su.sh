python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD HYBRIDRT_TEST_TOKENIZER=$PWD/.gpu/tokenizer
mkdir -p $OUT
for m in "import torch" "import torch; torch.cuda.init(); torch.zeros(1, device='cuda')" "import triton" "import graph_executor.process" "import jit_context.process" "import transformers"; do
  s=$(date +%s.%N); python3 -c "$m"; e=$(date +%s.%N); echo "$m: $(python3 -c "print(round($e-$s,2))") s"
done
python3 -X importtime -c "import graph_executor.process" 2> $OUT/importtime_executor.txt; sort -t'|' -k2 -n -r $OUT/importtime_executor.txt | head -25
python3 -X importtime -c "import jit_context.process" 2> $OUT/importtime_jit.txt; sort -t'|' -k2 -n -r $OUT/importtime_jit.txt | head -12
for r in 1 2; do timeout 120 python3 -m bench.probes.startup_profile --model dummy:smollm2-135m --top 25 > $OUT/startup_profile_$r.txt 2>&1; echo "profile $r rc=$?"; done
head -3 $OUT/startup_profile_2.txt; grep -A40 "warm-up and capture" $OUT/startup_profile_2.txt | head -45
timeout 150 python3 -m bench.probes.serve_ready --runs 3 -- --model dummy:smollm2-135m --tokenizer $HYBRIDRT_TEST_TOKENIZER --device cuda > $OUT/serve_ready.log 2>&1; echo "serve_ready rc=$?"; tail -25 $OUT/serve_ready.log
