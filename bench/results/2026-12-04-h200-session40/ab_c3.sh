set -u
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD HYBRIDRT_TEST_TOKENIZER=$PWD/.gpu/tokenizer
for i in 1 2; do for t in base new; do d=$PWD; [ $t = base ] && d=$PWD/.ab_base
  (cd "$d" && PYTHONPATH=/tmp/site:$d timeout 70 python3 -m launch.cli bench --quiet --model dummy:smollm2-135m \
    --tokenizer $HYBRIDRT_TEST_TOKENIZER --engines hybridrt --workloads speculative --speculative ngram --out "$OUT/sp_${t}_$i" > "$OUT/sp_${t}_$i.log" 2>&1)
  echo "spec $t $i: rc=$?"; grep -A6 -i "^## Speculative" "$OUT/sp_${t}_$i/results.md" | grep "|" | head -5
done; done
(cd "$OUT" && tar czf /tmp/r.tgz . && find . -mindepth 1 -delete && mv /tmp/r.tgz .)
