python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD HYBRIDRT_TEST_TOKENIZER=$PWD/.gpu/tokenizer
mkdir -p $OUT
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $OUT/card.txt
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_decode_contexts.py tests/test_executor_argmax.py \
  tests/test_rope_in_attention.py > $OUT/cuda_tests.log 2>&1; echo "tests: rc=$? $(tail -1 $OUT/cuda_tests.log)"
timeout 150 python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_gpu_path.py -k "graph or capture or argmax" \
  > $OUT/cuda_gpu_path.log 2>&1; echo "gpu_path: rc=$? $(tail -1 $OUT/cuda_gpu_path.log)"
timeout 150 python3 -m bench.probes.step_variants --models llama-2-7b,llama-3-8b --contexts 128,300 --rounds 5 \
  --variants "fused=0;fused=0,ctx=512;fused=0,ctx=1024;fused=0" > $OUT/sv_ctx_short.md 2>&1; echo "sv short rc=$?"
timeout 150 python3 -m bench.probes.step_variants --models llama-2-7b,llama-3-8b --contexts 1000,2000 --rounds 5 \
  --variants "fused=0;fused=0,ctx=2048;fused=0" > $OUT/sv_ctx_long.md 2>&1; echo "sv long rc=$?"
timeout 100 python3 -m bench.probes.step_variants --models llama-3.2-1b --contexts 128,300 --rounds 5 \
  --variants "fused=0;fused=0,ctx=512;fused=0" > $OUT/sv_ctx_1b.md 2>&1; echo "sv 1b rc=$?"
timeout 100 python3 -m bench.probes.step_variants --models smollm2-135m --contexts 128,300 --rounds 5 \
  --variants "fused=1;fused=1,ctx=512;fused=1" > $OUT/sv_ctx_smol.md 2>&1; echo "sv smol rc=$?"
for m in llama-2-7b llama-3-8b llama-3.2-1b; do
  timeout 170 python3 -m launch.cli bench --quiet --model "dummy:$m" --engines hybridrt,hybridrt-executor \
    --workloads context,floors --contexts 128,512,2048 --max-context 4096 --out "$OUT/t1_$m" > "$OUT/t1_$m.log" 2>&1
  echo "$m: rc=$?"; grep -E "^\| (128|512|2048) \||P50 at context" "$OUT/t1_$m/results.md"
done
grep -h "ctx\|fused=0 \|fused=1 " $OUT/sv_ctx_*.md | grep "^|"
