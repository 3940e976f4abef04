python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
mkdir -p $OUT
sv() { local name=$1; shift; timeout 150 python3 -m bench.probes.step_variants --rounds 5 "$@" > $OUT/$name.md 2>&1; echo "$name rc=$?"; }
sv lt_short --models llama-2-7b,llama-3-8b --contexts 128,300 \
  --variants "fused=0;fused=0,lt=1;fused=0,lt=2;fused=0,lt=3;fused=0,ctx=512,lt=3;fused=0,ctx=512,lt=1;fused=0"
sv lt_long --models llama-2-7b,llama-3-8b --contexts 2000 \
  --variants "fused=0;fused=0,lt=1;fused=0,lt=3;fused=0,ctx=2048,lt=3;fused=0"
sv lt_1b --models llama-3.2-1b --contexts 128,300 --variants "fused=0;fused=0,lt=1;fused=0,lt=2;fused=0,lt=3;fused=0"
sv lt_smol --models smollm2-135m --contexts 128,300 \
  --variants "fused=1;fused=1,lt=1;fused=1,ctx=512,lt=1;fused=1,ctx=512;fused=1"
cat $OUT/lt_*.md | grep "^| [ls]"
