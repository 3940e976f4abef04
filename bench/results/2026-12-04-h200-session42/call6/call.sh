python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
mkdir -p $OUT
timeout 60 python3 -m bench.probes.step_variants --rounds 5 --models llama-2-7b --contexts 300 \
  --variants "fused=0;fused=0,ctx=512;fused=0,ctx=1024;fused=0;fused=0,ctx=1024;fused=0,ctx=512;fused=0" > $OUT/ctx_repeat.md 2>&1
echo "repeat rc=$?"; grep "^| l" $OUT/ctx_repeat.md
for r in 1 2; do for t in base new; do
  if [ $t = base ]; then dir=.ab_base; else dir=$PWD; fi
  (cd $dir && PYTHONPATH=/tmp/site:$dir timeout 80 python3 -m launch.cli bench --quiet --model dummy:smollm2-135m \
    --engines hybridrt --workloads decode --max-context 4096 --out $OUT/smol_${t}_$r > $OUT/smol_${t}_$r.log 2>&1)
  echo "$t $r: rc=$? $(grep -E '^\| hybridrt' $OUT/smol_${t}_$r/results.md | head -1)"
done; done
