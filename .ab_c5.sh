cp .gg_ab/part.ab /tmp/ ; python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >/dev/null 2>&1; export PYTHONPATH=/tmp/site:$PWD
V="fused=0;fused=0,o=2x4096x4;fused=0,o=2x4096x4,earlyo=1;fused=0,o=4x4096x8;fused=0,o=4x4096x8,earlyo=1;fused=0,o=1x4096x4,earlyo=1;fused=0,earlyo=1;fused=0"
timeout 280 python3 -m bench.probes.step_variants --models llama-2-7b --contexts 300,2000 --rounds 5 --variants "$V" > $OUT/sv_7b_o.md 2>&1; echo "sv rc=$?"; tail -18 $OUT/sv_7b_o.md
