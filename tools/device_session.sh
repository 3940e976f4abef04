#!/usr/bin/env bash
# One call on the GPU machine (the `device` tool): cuda tests, the full bench and the two-process probe, with
# logs under $OUT and a short table last. Needs the wheels in .whl/ (../shared/device/wheels.sh pyzmq gguf
# fastapi uvicorn openai ...) and SmolLM2's tokenizer files in .gpu/tokenizer/ (carry: [".whl", ".gpu"]).
#
#   run: bash tools/device_session.sh [tests|bench|probe|profile|quant|gemv|gemm|fp8|batching ...]   (default: the
#   first three, ~6-7 min); everything under $OUT comes back as one archive, $OUT/device_session.tgz
#   batching: the batch and extend kernel tests, and the cuda tests of batching, prefix reuse and the GPU path (the
#   SmolLM2 ones need HYBRIDRT_TEST_GGUF, ~4 min); batchbench:
#   bench.probes.batch_step and bench.probes.extend_attention, then one `bench --prefix-reuse` per slot count on
#   dummy:llama-2-7b: `--workloads decode,concurrency,turns --max-num-seqs 4` and `decode,turns --max-num-seqs 1`
#   (~6 min); attention: the attention kernel tests, the decode attention sweep (bench.probes.decode_attention) and
#   bench.probes.graph_gaps at positions 300 and 2000 against split 64 on 4 warps, a verify of 5 tokens per split, and
#   bench.probes.step_variants (the whole batch-1 step per attention config, alternating rounds) (~4 min); neartie:
#   bench.probes.near_tie on $HYBRIDRT_TEST_GGUF for the batching test's request 5 at 4 and 2 warps (~1 min);
#   http: bench.probes.http_split,
#   the OpenAI API's TTFT segment by segment on dummy:smollm2-135m with SmolLM2's tokenizer (~1 min); startup: bench.probes.serve_ready on $HYBRIDRT_TEST_GGUF, 3 fresh starts (~1 min)
#   densesplitk: the split-K dense GEMV tests and bench.probes.dense_splitk (o and down of LLaMA-2-7B against the fp16
#   kernels, then the whole step with the winners; ~5 min); hops: bench.probes.socket_hop (round trips, then a stream at 4 ms: one-way latency tails), bench.probes.async_wait (the
#   AsyncClient's waits on asyncio and uvloop), bench.probes.client_spin on the SmolLM2 and 7B shapes, and http_split with the
#   clients' spinning wait off and on and the app on asyncio + h11 or uvloop + httptools (issue 12's hops to the
#   client and the HTTP path; needs the uvloop and httptools wheels: wheels.sh uvloop httptools; ~5 min)
#   localstream: the cuda tests of the split-K plans and the local stream, then `bench` on dummy:llama-2-7b (decode
#   and context 128/512/2048: the client's P99 over the local stream; ~4 min); clientspin: bench.probes.client_spin on
#   the 7B shape (ZeroMQ and the local stream, sleeping and spinning) and `bench` decode on the 1B and SmolLM2 shapes
#   (~4 min)
#   stepfusions: the RoPE-inside-attention and early-weights tests on the card, then bench.probes.step_variants with
#   and without each on the 7B, 1B and SmolLM2 shapes (~6 min); stepdefaults: the fusions as chosen per model size
#   against neither, and the bench's decode on the SmolLM2 and 7B shapes (~5 min); hfeager: bench.probes.hf_eager at
#   contexts 128 and 1024 (why the bench's hf-eager row is slow and erratic; ~2 min); prefetch: the L2 prefetch of
#   the layer's next weights from the attention kernel, its test and the step at 8 / 24 / 40 MiB (~3 min); shortsteps:
#   bench.probes.kernel_profile of 7B's 10-token prefill and the 1B shape's decode (~2 min); shortsteps2, shortrows,
#   shortab, gguftests, verifyrows, ncu, execargmax: each says what it runs in its comment below;
#   tiles: the tile-major packed weights' cuda tests and the 7B int4 / int8 step with o and down (and every slot)
#   tiled against row-major (~4 min);
#   quant: the packed-weight tests and `bench --quantize none,int8,int4,fp8` on dummy:llama-2-7b (executor, ~3 min);
#   gemv: the low-bit GEMV block sweep per projection and format (~1 min); gemm: the low-bit prefill GEMM's default
#   configs against torch.mm per projection, format and prompt length (~1 min); fp8: the FP8 split-K GEMV sweep
#   against the old fp16-kernel path (bench/probes/fp8_splitk.py, < 2 min) and tests/test_gemv_fp8.py. The SmolLM2
#   Q4_1 cuda test and the quality report need the 94 MiB GGUF: split it in two (split -b 48M), carry one half per
#   call while the machine is warm, `cat` them into /tmp and export HYBRIDRT_TEST_GGUF (see bench/NOTES.md, issue 10).
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
export HYBRIDRT_TEST_TOKENIZER=$PWD/.gpu/tokenizer
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(tests bench probe)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/card.txt"
python3 -c "from bench.envinfo import source_digest; print('sources sha256', source_digest())" | tee -a "$OUT/card.txt"
idle_gap() {  # NAME LIMIT_S: bench.probes.idle_gap on the SmolLM2 shape into $OUT/NAME.md, printed
  timeout "$2" python3 -m bench.probes.idle_gap --model dummy:smollm2-135m --device cuda --repeats 7 \
    > "$OUT/$1.md" 2>&1
  echo "idle gap: rc=$?"; cat "$OUT/$1.md"
}
first_requests() {  # NAME LIMIT_S: the bench's startup workload (SmolLM2 shape, its tokenizer) into $OUT/NAME/
  timeout "$2" python3 -m launch.cli bench --quiet --model dummy:smollm2-135m --tokenizer "$HYBRIDRT_TEST_TOKENIZER" \
    --engines hybridrt --workloads startup --prompt-lens 100 --repeats 5 --out "$OUT/$1" > "$OUT/$1.log" 2>&1
  local rc=$?; echo "bench startup $1: rc=$rc"; grep -E "first 5|after 2 s idle" "$OUT/$1/results.md"
}
tree_copy() {  # DIR: a copy of the runtime's packages in DIR (an A/B's other tree, patched by the caller)
  rm -rf "$1" && mkdir "$1" && cp -r graph_executor jit_context ipc launch bench hybridrt "$1"/
}
struct_ab() {  # PREFIX ROUNDS REQUESTS LIMIT_S: structured_cost (SmolLM2 shape, batch-1) from this tree and from a
  # copy with the 45th session's grammar_mask.py (.ab_grammar_mask.py, carried: `git show
  # 7085152:jit_context/grammar_mask.py > .ab_grammar_mask.py`), ROUNDS alternating rounds, into $OUT/PREFIX_<side>_<i>.md
  tree_copy /tmp/gm_old && cp .ab_grammar_mask.py /tmp/gm_old/jit_context/grammar_mask.py || exit 1
  # (the old file has no prepare_in_background: its side builds llguidance's vocabulary at first use, as then)
  sed -i 's/^        side.grammars.prepare_in_background()$/        pass/' /tmp/gm_old/jit_context/process.py
  for i in $(seq "$2"); do for t in old new; do d=$PWD; [ $t = old ] && d=/tmp/gm_old
    (cd "$d" && PYTHONPATH=/tmp/site:$d timeout "$4" python3 -m bench.probes.structured_cost --model dummy:smollm2-135m \
      --tokenizer "$HYBRIDRT_TEST_TOKENIZER" --device cuda --requests "$3" --max-num-seqs 1 > "$OUT/$1_${t}_$i.md" 2>&1)
    echo "structured cost, $t $i: rc=$?"; tail -3 "$OUT/$1_${t}_$i.md"
  done; done
}
decode_ab() {  # PREFIX SIDE DIR [PRESET [MAX_CONTEXT]]: the bench's decode (default SmolLM2's shapes at max context
  # 512), three alternating rounds of off and on, SIDE (off or on) run from the copy in DIR and the other from this
  # tree; two processes and the executor, into $OUT/PREFIX_<side>_<i>
  for i in 1 2 3; do for t in off on; do d=$PWD; [ $t = "$2" ] && d=$3
    (cd "$d" && PYTHONPATH=/tmp/site:$d timeout 100 python3 -m launch.cli bench --quiet --model "dummy:${4:-smollm2-135m}" \
      --engines hybridrt,hybridrt-executor --workloads decode --max-context "${5:-512}" --out "$OUT/$1_${t}_$i" \
      > "$OUT/$1_${t}_$i.log" 2>&1)
    echo "$t $i: $(grep -E '^\| hybridrt' "$OUT/$1_${t}_$i.log" | head -2 | cut -d'|' -f2,3,5,7 | tr '\n' ' ')"
  done; done
}
http_ab() {  # http_split per loop variant: old (sleeping clients, asyncio + h11), spinning clients alone, both new
  # (spinning, uvloop + httptools); each run has two apps on one serve, their client over the local stream and over
  # ZeroMQ (A/B)
  for v in old spin new; do a=(--loop asyncio --http h11); [ $v = old ] && a+=(--client-spin-ms 0)
    [ $v = new ] && a=(--loop uvloop --http httptools)
    timeout 120 python3 -m bench.probes.http_split --requests 30 "${a[@]}" -- --model dummy:smollm2-135m \
      --tokenizer "$HYBRIDRT_TEST_TOKENIZER" --device cuda > "$OUT/http_split_$v.md" 2>&1
    echo "HTTP TTFT split, $v (${a[*]}): rc=$?"; grep -E "TTFT|asked ->|client ->|first token" "$OUT/http_split_$v.md"
  done
}
for step in "${steps[@]}"; do
  case $step in
    tp1) # issue 15 on one GPU: the tensor-parallel cuda tests that one GPU runs (NCCL collectives inside a graph, too
         # many ranks for the GPUs), then the single-GPU paths the change touched (captures before ready, speculation)
         timeout 150 python3 -m pytest -q -m cuda -p no:cacheprovider -rs tests/test_tensor_parallel_gpu.py \
           > "$OUT/tp_gpu_tests.log" 2>&1
         echo "tp cuda tests: rc=$? $(tail -1 "$OUT/tp_gpu_tests.log")"; grep -E "SKIP|FAIL|Error" "$OUT/tp_gpu_tests.log" | head
         timeout 330 python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_gpu_path.py tests/test_speculative.py \
           tests/test_process_lifetime.py > "$OUT/tp_single_tests.log" 2>&1
         echo "single-GPU cuda tests: rc=$? $(tail -1 "$OUT/tp_single_tests.log")"; grep -E "FAIL|Error" "$OUT/tp_single_tests.log" | head ;;
    tp2) # issue 15 on kind nvidia-h200-x2: the GPU tensor-parallel tests (two ranks' served tokens, a killed rank),
         # one token's all-reduce, then the bench: 7B at 1 and 2 ranks side by side, 70B at 2 (~8 min)
         timeout 200 python3 -m pytest -q -m cuda -p no:cacheprovider -rs tests/test_tensor_parallel_gpu.py \
           > "$OUT/tp2_tests.log" 2>&1
         echo "tp cuda tests: rc=$? $(tail -1 "$OUT/tp2_tests.log")"; grep -E "SKIP|FAIL|Error" "$OUT/tp2_tests.log" | head
         timeout 60 python3 -m bench.allreduce --device cuda --ranks 2 --hidden 4096 2>&1 | tail -1
         # the one-kernel all-reduce over peer memory (44th session, CPU-tested; `peerar` checks it on one GPU first):
         # its latency, then the 7B TP=2 decode with it (issue 15's 0.62x needs ~64 all-reduces at <= ~4 us)
         timeout 60 python3 -m bench.allreduce --device cuda --ranks 2 --hidden 4096 --how peer 2>&1 | tail -1
         timeout 150 python3 -m launch.cli bench --quiet --model dummy:llama-2-7b --engines hybridrt \
           --workloads floors,decode --tensor-parallel 2 --tp-allreduce peer --out "$OUT/tp_7b_peer" \
           > "$OUT/tp_7b_peer.log" 2>&1
         echo "bench 7b tp 2, peer all-reduce: rc=$?"; grep -A4 "^| engine | P50" "$OUT/tp_7b_peer/results.md" 2>/dev/null | head -6
         timeout 200 python3 -m launch.cli bench --quiet --model dummy:llama-2-7b --engines hybridrt \
           --workloads floors,decode,ttft --prompt-lens 10,100,500 --tensor-parallel 1,2 --out "$OUT/tp_7b" \
           > "$OUT/tp_7b.log" 2>&1
         echo "bench 7b tp 1,2: rc=$?"; cat "$OUT/tp_7b/tensor_parallel.md" 2>/dev/null
         timeout 240 python3 -m launch.cli bench --quiet --model dummy:llama-2-70b --engines hybridrt \
           --workloads floors,decode,ttft --prompt-lens 10,100,500 --tensor-parallel 2 --out "$OUT/tp_70b" \
           > "$OUT/tp_70b.log" 2>&1
         echo "bench 70b tp 2: rc=$?"; grep -E "Tensor parallel|Decode floor" "$OUT/tp_70b/results.md" 2>/dev/null
         grep -A4 "^| engine | P50" "$OUT/tp_70b/results.md" 2>/dev/null | head -6 ;;
    tests) timeout 330 python3 -m pytest -q -m cuda -p no:cacheprovider > "$OUT/cuda_tests.log" 2>&1
           echo "cuda tests: rc=$? $(tail -1 "$OUT/cuda_tests.log")" ;;
    bench) timeout 420 python3 -m launch.cli bench --quiet --out "$OUT/run" > "$OUT/bench.log" 2>&1
           echo "bench: rc=$?"; rm -rf "$OUT/run/logs" ;;
    probe) timeout 120 python3 -m bench.probes.e2e_probe > "$OUT/e2e_probe.log" 2>&1; echo "e2e probe: rc=$?" ;;
    profile) timeout 180 python3 -m bench.probes.kernel_profile > "$OUT/kernel_profile.md" 2>&1
             echo "kernel profile: rc=$?"; cat "$OUT/kernel_profile.md" ;;
    tiles) # tile-major packed weights (quant/tiles.py): their cuda tests, then the 7B step row-major against o and
           # down tiled (tile=2) and every slot tiled (tile=1), int4 and int8 (~4 min)
           timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_tiles.py tests/test_gemv_splitk.py \
             tests/test_quant_model.py > "$OUT/tile_tests.log" 2>&1
           echo "tile tests: rc=$? $(tail -1 "$OUT/tile_tests.log")"
           for q in int4 int8; do
             timeout 150 python3 -m bench.probes.step_variants --models llama-2-7b --contexts 300,2000 --rounds 5 \
               --quantize $q --variants "fused=0;fused=0,tile=2;fused=0,tile=1;fused=0;fused=0,tile=2" \
               > "$OUT/step_tiles_$q.md" 2>&1
             echo "step tiles $q: rc=$?"; cat "$OUT/step_tiles_$q.md"
           done ;;
    quant) timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_quant.py tests/test_quant_gemm.py \
             tests/test_quant_model.py > "$OUT/quant_tests.log" 2>&1
           echo "quant tests: rc=$? $(tail -1 "$OUT/quant_tests.log")"
           timeout 360 python3 -m launch.cli bench --quiet --model dummy:llama-2-7b --engines hybridrt-executor \
             --workloads floors,decode,ttft,context,memory --prompt-lens 10,50,100,500 --repeats 3 --contexts 512 \
             --context-steps 32 --decode-tokens 128 --decode-prompt-len 50 --timeout 150 \
             --quantize none,int8,int4,fp8 --out "$OUT/formats" > "$OUT/formats.log" 2>&1
           echo "formats bench: rc=$?"; rm -rf "$OUT"/formats/*/logs; cat "$OUT/formats/formats.md" ;;
    gemm) timeout 240 python3 -m bench.probes.lowbit_gemm --tokens 16,32,64,127,128,512 --out "$OUT/gemm" \
            > "$OUT/gemm.log" 2>&1
          echo "gemm probe: rc=$?"; cat "$OUT/gemm.log" ;;
    gemv) timeout 300 python3 -m bench.probes.lowbit_gemv --out "$OUT/gemv" > "$OUT/gemv.log" 2>&1
          echo "gemv sweep: rc=$?"; cat "$OUT/gemv.log" ;;
    fp8) timeout 200 python3 -m bench.probes.fp8_splitk --out "$OUT/fp8" > "$OUT/fp8_splitk.log" 2>&1
         echo "fp8 split-K probe: rc=$?"; sed -n '/^| projection/,$p' "$OUT/fp8_splitk.log"
         timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_gemv_fp8.py > "$OUT/fp8_tests.log" 2>&1
         echo "fp8 tests: rc=$? $(tail -1 "$OUT/fp8_tests.log")" ;;
    batching) timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_extend_attention.py \
                tests/test_batch_kernels.py > "$OUT/batch_kernel_tests.log" 2>&1
              rc=$?; echo "batch kernel tests: rc=$rc $(tail -1 "$OUT/batch_kernel_tests.log")"
              if [ $rc -ne 0 ]; then grep -E '^(FAILED|ERROR)' "$OUT/batch_kernel_tests.log" | head -20; continue; fi
              timeout 300 python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_runtime_batching.py \
                tests/test_prefix_reuse.py tests/test_gpu_path.py > "$OUT/batching_tests.log" 2>&1
              echo "batching cuda tests: rc=$? $(tail -1 "$OUT/batching_tests.log")"
              grep -E '^(FAILED|ERROR)' "$OUT/batching_tests.log" | head -20 ;;
    batchbench) timeout 150 python3 -m bench.probes.batch_step --out "$OUT/batch_step" > "$OUT/batch_step.log" 2>&1
              echo "batch step probe: rc=$?"; cat "$OUT/batch_step.log"
              timeout 100 python3 -m bench.probes.extend_attention --out "$OUT/extend" > "$OUT/extend.log" 2>&1
              echo "extend attention probe: rc=$?"; cat "$OUT/extend.log"
              for n in 4 1; do w=decode,turns; [ $n = 4 ] && w=decode,concurrency,turns
                timeout 260 python3 -m launch.cli bench --quiet --model dummy:llama-2-7b --engines hybridrt \
                  --workloads $w --prefix-reuse --max-num-seqs $n --decode-tokens 128 --repeats 3 \
                  --out "$OUT/slots-$n" > "$OUT/slots-$n.log" 2>&1
                echo "bench --max-num-seqs $n: rc=$?"
                sed -n '/^## Decode/,/^## Engines/p' "$OUT/slots-$n.log" | grep -v '^$' | grep -v '^|---'
              done ;;
    attention) timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_batch_kernels.py \
                 tests/test_extend_attention.py tests/test_kernel_globals.py > "$OUT/attention_tests.log" 2>&1
               echo "attention kernel tests: rc=$? $(tail -1 "$OUT/attention_tests.log")"
               timeout 150 python3 -m bench.probes.decode_attention --splits default,32,64 --warps 1,2,4 \
                 > "$OUT/decode_attention.md" 2>&1; echo "decode attention sweep: rc=$?"; cat "$OUT/decode_attention.md"
               timeout 90 python3 -m bench.probes.decode_attention --kv-heads 8 --rows 1 --contexts 300,2000 \
                 --max-context 4096 --splits default,32,64 --warps 1,2 > "$OUT/decode_attention_gqa.md" 2>&1
               echo "GQA decode attention: rc=$?"; cat "$OUT/decode_attention_gqa.md"
               timeout 90 python3 -m bench.probes.decode_attention --rows 1 --contexts 300,2000 --max-context 4096 \
                 --splits 32,64,128 --warps 1 --reduce fused --verify-tokens 5 > "$OUT/verify_attention.md" 2>&1
               echo "verify attention: rc=$?"; grep -E "verify|^\| cache" "$OUT/verify_attention.md"
               timeout 200 python3 -m bench.probes.step_variants --models llama-2-7b,smollm2-135m,llama-3.2-1b \
                 > "$OUT/step_variants.md" 2>&1; echo "step variants: rc=$?"; cat "$OUT/step_variants.md"
               for p in 300 2000; do
                 timeout 90 python3 -m bench.probes.graph_gaps --batches 1,4 --split-sizes 64 --position $p \
                   > "$OUT/graph_gaps_$p.md" 2>&1; echo "graph gaps at $p: rc=$?"; grep '^| [bs]' "$OUT/graph_gaps_$p.md"
               done ;;
    neartie) for w in 4 2; do  # SmolLM2's request 5 of the batching cuda test, alone, on 4 and 2 warps (needs the GGUF)
               timeout 120 python3 -m bench.probes.near_tie --model "$HYBRIDRT_TEST_GGUF" --dequantize --device cuda \
                 --prompt "The quick brown fox" --max-tokens 44 --row-warps $w > "$OUT/near_tie_$w.md" 2>&1
               echo "near tie, $w warps: rc=$?"; cat "$OUT/near_tie_$w.md"
             done ;;
    http) timeout 120 python3 -m bench.probes.http_split --requests 30 -- --model dummy:smollm2-135m \
            --tokenizer "$HYBRIDRT_TEST_TOKENIZER" --device cuda > "$OUT/http_split.md" 2>&1
          echo "HTTP TTFT split: rc=$?"; cat "$OUT/http_split.md" ;;
    startup) timeout 240 python3 -m bench.probes.serve_ready --runs 3 --json "$OUT/serve_ready.json" -- \
               --model "$HYBRIDRT_TEST_GGUF" --device cuda > "$OUT/serve_ready.log" 2>&1
             echo "serve_ready: rc=$?"; tail -6 "$OUT/serve_ready.log" ;;
    hops) timeout 60 python3 -m bench.probes.socket_hop > "$OUT/socket_hop.md" 2>&1
          echo "socket hops: rc=$?"; cat "$OUT/socket_hop.md"
          # a token stream's one-way latency tail at a 7B step's cadence (the client's gap P99)
          timeout 90 python3 -m bench.probes.socket_hop --cadence-ms 4 --messages 2000 > "$OUT/socket_stream.md" 2>&1
          echo "socket stream: rc=$?"; cat "$OUT/socket_stream.md"
          # the HTTP app's client waits alone (no uvicorn): asyncio vs uvloop, sleeping vs spinning
          timeout 90 python3 -m bench.probes.async_wait > "$OUT/async_wait.md" 2>&1
          echo "async wait: rc=$?"; cat "$OUT/async_wait.md"
          for m in smollm2-135m llama-2-7b; do a=(--requests 40 --tokens 32)
            [ $m = llama-2-7b ] && a=(--requests 16 --tokens 256 --prompt-len 500)  # gaps at context 500-756
            timeout 150 python3 -m bench.probes.client_spin --model dummy:$m --device cuda "${a[@]}" \
              > "$OUT/client_spin_$m.md" 2>&1; echo "client spin, $m: rc=$?"; tail -4 "$OUT/client_spin_$m.md"
          done
          http_ab ;;
    httpab) http_ab ;;  # the HTTP A/B of `hops` alone
    stepfusions) # issue 12: RoPE + KV append inside the decode attention kernel (FusedDecoder(fuse_rope=True)) and
                 # the GEMVs' weights loaded before their PDL wait (early_weights=True): their tests on the card, then
                 # the whole step per variant, alternating rounds (production defaults otherwise)
          timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_rope_in_attention.py tests/test_early_weights.py \
            tests/test_kernels.py -k "rope or decode_attention or fused_decoder or early or gemv" \
            > "$OUT/step_fusions_tests.log" 2>&1
          echo "step-fusion tests: rc=$? $(tail -1 "$OUT/step_fusions_tests.log")"
          timeout 370 python3 -m bench.probes.step_variants --models llama-2-7b,llama-3.2-1b,smollm2-135m \
            --contexts 300,2000 --rounds 5 --variants "fused=0;fused=0,rope=1;fused=0,early=1;fused=0,rope=1,early=1" \
            > "$OUT/step_variants_fusions.md" 2>&1
          echo "step variants (rope inside, early weights): rc=$?"; grep '^|' "$OUT/step_variants_fusions.md" ;;
    spec) # issue 11's committed workload on the SmolLM2 GGUF (needs HYBRIDRT_TEST_GGUF): n-gram against off
          timeout 300 python3 -m launch.cli bench --quiet --model "$HYBRIDRT_TEST_GGUF" --workloads speculative \
            --speculative off,ngram --spec-tokens 128 --out "$OUT/spec-gguf" > "$OUT/spec-gguf.log" 2>&1
          echo "speculative bench (gguf): rc=$?"; grep '^|' "$OUT/spec-gguf/speculative.md" ;;
    densesplitk) timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_gemv_dense_splitk.py \
                   > "$OUT/dense_splitk_tests.log" 2>&1
                 echo "dense split-K tests: rc=$? $(tail -1 "$OUT/dense_splitk_tests.log")"
                 timeout 420 python3 -m bench.probes.dense_splitk > "$OUT/dense_splitk.md" 2>&1
                 echo "dense split-K probe: rc=$?"; sed -n '/^| projection/,$p' "$OUT/dense_splitk.md" ;;
    densesplitk1b) timeout 270 python3 -m bench.probes.dense_splitk --model llama-3.2-1b --shapes qkv,o,down \
                     > "$OUT/dense_splitk_1b.md" 2>&1
                   echo "dense split-K probe (Llama-3.2-1B): rc=$?"; sed -n '/^| projection/,$p' "$OUT/dense_splitk_1b.md"
                   timeout 200 python3 -m bench.probes.dense_splitk --model smollm2-135m --shapes o,down --layers 30 \
                     > "$OUT/dense_splitk_smollm2.md" 2>&1
                   echo "dense split-K probe (SmolLM2-135M): rc=$?"; sed -n '/^| projection/,$p' "$OUT/dense_splitk_smollm2.md" ;;
    localstream) # issue 12's client P99 with the local stream (ipc/local_stream.py) and the measured decode plans
          timeout 150 python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_gemv_dense_splitk.py \
            tests/test_local_stream.py tests/test_reply_spin.py > "$OUT/localstream_tests.log" 2>&1
          echo "cuda tests (split-K plans, local stream): rc=$? $(tail -1 "$OUT/localstream_tests.log")"
          timeout 300 python3 -m launch.cli bench --quiet --model dummy:llama-2-7b --engines hybridrt,hybridrt-executor \
            --workloads floors,decode,context --contexts 128,512,2048 --out "$OUT/bench-7b" > "$OUT/bench-7b.log" 2>&1
          echo "bench 7B: rc=$?"; sed -n '/^## Decode/,/^## Ratios/p' "$OUT/bench-7b/results.md" ;;
    clientspin) timeout 200 python3 -m bench.probes.client_spin --model dummy:llama-2-7b --device cuda --requests 12 \
                  --tokens 256 --prompt-len 500 > "$OUT/client_spin_7b.md" 2>&1
                echo "client spin 7B: rc=$?"; cat "$OUT/client_spin_7b.md"
                for m in llama-3.2-1b smollm2-135m; do
                  timeout 200 python3 -m launch.cli bench --quiet --model dummy:$m --engines hybridrt,hybridrt-executor \
                    --workloads floors,decode --out "$OUT/bench-$m" > "$OUT/bench-$m.log" 2>&1
                  echo "bench $m: rc=$?"; sed -n '/^## Decode/,/^## Per-token/p' "$OUT/bench-$m/results.md"
                done ;;
    stepdefaults) # issue 12: the step's fusions chosen per model size (decode_plan.options_for): the graph tests with
                  # them, the production step against neither fusion (Llama-3.2-1B also against RoPE inside alone, 9
                  # rounds; 7B and SmolLM2 also with the attention's in-kernel combine of the splits, fused=1, and
                  # with o_proj's weights loaded early, earlyo=1), then the bench's decode on SmolLM2's and 7B's shapes
          timeout 90 python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_gpu_path.py \
            -k "replay or chunked or continuing or llama_shaped" > "$OUT/stepdefaults_tests.log" 2>&1
          echo "cuda tests (graphs with the step options): rc=$? $(tail -1 "$OUT/stepdefaults_tests.log")"
          timeout 60 python3 -m bench.probes.step_variants --models llama-3.2-1b --contexts 300,2000 --rounds 9 \
            --variants "fused=0,rope=0,early=0;fused=0,rope=1,early=0;fused=0" > "$OUT/step_variants_1b.md" 2>&1
          timeout 80 python3 -m bench.probes.step_variants --models llama-2-7b,smollm2-135m --contexts 300,2000 \
            --rounds 5 --variants "fused=0,rope=0,early=0;fused=0;fused=1;fused=0,earlyo=1" \
            > "$OUT/step_variants_defaults.md" 2>&1
          echo "step variants (second: the production step): rc=$?"; grep -h '^| [ls]' "$OUT"/step_variants_{1b,defaults}.md
          for m in smollm2-135m llama-2-7b; do
            timeout 80 python3 -m launch.cli bench --quiet --model dummy:$m --engines hybridrt,hybridrt-executor \
              --workloads floors,decode --out "$OUT/bench-$m" > "$OUT/bench-$m.log" 2>&1
            echo "bench $m: rc=$?"; sed -n '/^## Decode/,/^## Per-token/p' "$OUT/bench-$m/results.md" | grep '^| hy'
          done ;;
    hfeager) # issue 12's hf-eager question: the bench's loop split into host time and wait, per variant (cuDNN SDPA
             # off, plain again: its second run, threads, collector), with CPU time, steal time, collections (~2 min)
          for ctx in 128 1024; do
            timeout 150 python3 -m bench.probes.hf_eager --model llama-2-7b --context $ctx --steps 64 \
              --variants plain,no-cudnn,plain,threads1,nogc > "$OUT/hf_eager_$ctx.md" 2>&1
            echo "hf eager probe, context $ctx: rc=$?"; cat "$OUT/hf_eager_$ctx.md"
          done ;;
    prefetch) # issue 12: the layer's next weights asked into L2 by the decode attention kernel (kernels/l2_prefetch.py,
              # FusedDecoder(l2_prefetch_mb=)) and the next projection's by each GEMV's tail (tail_prefetch_mb=): the
              # bit-identity test on the card, then the production step against attention budgets of 8, 24 and 40
              # MiB, tail budgets of 4 and 16, and 24 + 4, on the 7B, 1B and SmolLM2 shapes (~4 min)
          timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_l2_prefetch.py > "$OUT/prefetch_tests.log" 2>&1
          echo "L2 prefetch tests: rc=$? $(tail -1 "$OUT/prefetch_tests.log")"; grep -E '^(FAILED|E )' "$OUT/prefetch_tests.log" | head
          timeout 200 python3 -m bench.probes.step_variants --models llama-2-7b,llama-3.2-1b,smollm2-135m \
            --contexts 300,2000 --rounds 5 \
            --variants "fused=0;fused=0,pf=8;fused=0,pf=24;fused=0,pf=40;fused=0,tpf=4;fused=0,tpf=16;fused=0,pf=24,tpf=4" \
            > "$OUT/step_variants_prefetch.md" 2>&1
          echo "step variants (L2 prefetch): rc=$?"; grep '^|' "$OUT/step_variants_prefetch.md" ;;
    shortsteps) # issue 12's two figures furthest from target, per kernel: 7B's 10-token prefill (executor TTFT 4.54
                # ms, target 4.25) and the Llama-3.2-1B shape's decode (0.99 ms = 1.74x, target 1.4x), ~2 min
          timeout 120 python3 -m bench.probes.kernel_profile --prompt 10 --context 512 --top 20 \
            > "$OUT/kernel_profile_7b_p10.md" 2>&1
          echo "kernel profile, 7B, 10-token prefill: rc=$?"; cat "$OUT/kernel_profile_7b_p10.md"
          timeout 120 python3 -m bench.probes.kernel_profile --model dummy:llama-3.2-1b --prompt 10 --context 512 \
            --top 20 > "$OUT/kernel_profile_1b.md" 2>&1
          echo "kernel profile, 1B: rc=$?"; cat "$OUT/kernel_profile_1b.md" ;;
    shortsteps2) # issue 12's 50-token prefill and issue 10's int4 decode (2.26 ms = 2.31x its floor), per kernel
          timeout 120 python3 -m bench.probes.kernel_profile --prompt 50 --context 512 --top 20 \
            > "$OUT/kernel_profile_7b_p50.md" 2>&1
          echo "kernel profile, 7B, 50-token prefill: rc=$?"; cat "$OUT/kernel_profile_7b_p50.md"
          timeout 150 python3 -m bench.probes.kernel_profile --quantize int4 --prompt 10 --context 512 --top 20 \
            > "$OUT/kernel_profile_7b_int4.md" 2>&1
          echo "kernel profile, 7B int4: rc=$?"; cat "$OUT/kernel_profile_7b_int4.md" ;;
    shortrows) # issue 12: the multi-row GEMVs (split-K, RMSNorm / SwiGLU / residual fused) for prompts of <= 64 rows:
               # their tests on the card, the sweep per projection and row count against cuBLAS, then the prefill step
               # per bucket with cuBLAS, the default plan and the sweep's winners (~6 min)
          timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_gemv_rows.py tests/test_kernels.py \
            -k "gemv_rows or fused_prefill" > "$OUT/shortrows_tests.log" 2>&1
          echo "rows tests: rc=$? $(tail -1 "$OUT/shortrows_tests.log")"
          timeout 330 python3 -m bench.probes.gemv_rows --rows 16,32,64 --out "$OUT/rows_sweep" \
            --plan-out "$OUT/rows_plan.json" > "$OUT/rows_sweep.log" 2>&1
          echo "rows sweep: rc=$?"; grep "^|" "$OUT/rows_sweep.log"; cat "$OUT/rows_plan.json"
          timeout 150 python3 -m bench.probes.prefill_rows --plan "$OUT/rows_plan.json" > "$OUT/prefill_rows.md" 2>&1
          echo "prefill rows: rc=$?"; cat "$OUT/prefill_rows.md" ;;
    shortab) # issue 12: the prefill step at 16 and 32 rows, cuBLAS against the short-prompt plan (the default, the
             # whole sweep's winners in bench/results/2026-12-02-h200-short-prompts/rows_plan.json, each also with PDL)
             # on the 7B, 1B and SmolLM2 shapes, then the cuda tests of the GPU path and the batch kernels (~4 min)
          timeout 200 python3 -m bench.probes.prefill_rows --models llama-2-7b,llama-3.2-1b,smollm2-135m \
            --buckets 16,32 --plan bench/results/2026-12-02-h200-short-prompts/rows_plan.json \
            > "$OUT/prefill_ab.md" 2>&1
          echo "prefill A/B: rc=$?"; cat "$OUT/prefill_ab.md"
          timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_path.py tests/test_batch_kernels.py \
            tests/test_kernels.py tests/test_gemv_rows.py > "$OUT/shortab_tests.log" 2>&1
          echo "GPU path tests: rc=$? $(tail -1 "$OUT/shortab_tests.log")" ;;
    gguftests) # the identity tests with the SmolLM2 GGUF (HYBRIDRT_TEST_GGUF): batching, prefix reuse, packed model,
               # speculation (~2 min)
          timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_runtime_batching.py tests/test_prefix_reuse.py \
            tests/test_quant_model.py tests/test_speculative.py -m cuda > "$OUT/gguf_tests.log" 2>&1
          echo "GGUF identity tests: rc=$? $(tail -1 "$OUT/gguf_tests.log")" ;;
    ncu) # issues 10 and 12: Nsight Compute's counters for each decode projection's kernel, int4 and fp16, 7B shapes
         # (bench/probes/ncu_gemv.py: DRAM throughput, occupancy, issue activity, top stall reasons; ~2 min)
          timeout 300 ncu --clock-control none --csv --kernel-name regex:'splitk|gemv|rows' \
            --metrics "$(python3 -m bench.probes.ncu_gemv --metrics)" python3 -m bench.probes.ncu_gemv \
            --formats int4,fp16 > "$OUT/ncu.csv" 2> "$OUT/ncu.err"
          echo "ncu: rc=$? $(tail -2 "$OUT/ncu.err")"
          python3 -m bench.probes.ncu_gemv --formats int4,fp16 --table "$OUT/ncu.csv" | tee "$OUT/ncu.md" ;;
    verifyrows) # issue 11/12: the verify step with qkv, o (and down) on the split-K multi-row GEMVs (the prefill step's
                # 16-row configs) against today's cuBLAS + row kernels, 7B and SmolLM2 shapes, and the verify tests
          timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_speculative.py -k "fused_verify" \
            > "$OUT/verifyrows_tests.log" 2>&1
          echo "verify tests: rc=$? $(tail -1 "$OUT/verifyrows_tests.log")"
          for m in llama-2-7b smollm2-135m; do
            timeout 150 python3 -m bench.probes.verify_plan --model dummy:$m --tokens 2,5,9 > "$OUT/verifyrows_$m.md" 2>&1
            echo "verify plans, $m: rc=$?"; cat "$OUT/verifyrows_$m.md"
          done ;;
    packedplans) # issue 10: the int4 / int8 split-K GEMVs at 256-512 weights a thread (bigger blocks or fewer warps:
                 # the program's fixed work spread over more weights), per projection (MODE 1, 32 layers a graph) and
                 # as whole 7B steps (bench.probes.packed_plans; ~4 min)
          timeout 200 python3 -m bench.probes.int4_splitk --layout shipped --bits 4 \
            --configs "32,64,4;64,64,4;128,32,4;64,32,4;128,64,8;256,32,8;64,128,8;128,64,4;64,64,2;128,16,4" \
            > "$OUT/packed_int4.log" 2>&1
          echo "int4 blocks: rc=$?"; grep -E "best|Error" "$OUT/packed_int4.log"
          timeout 200 python3 -m bench.probes.int4_splitk --layout shipped --bits 8 \
            --configs "32,128,4;64,128,8;32,256,8;64,128,4;128,64,4;64,64,4;128,128,8;64,256,8" \
            > "$OUT/packed_int8.log" 2>&1
          echo "int8 blocks: rc=$?"; grep -E "best|Error" "$OUT/packed_int8.log"
          timeout 200 python3 -m bench.probes.packed_plans --quantize int4 --contexts 300 \
            --plans "${PACKED_PLANS:-default;all=64x64x4;all=128x32x4;all=128x64x8;all=64x64x2}" \
            > "$OUT/packed_plans_int4.md" 2>&1
          echo "int4 step plans: rc=$?"; cat "$OUT/packed_plans_int4.md" ;;
    reducekernel) # issues 10 and 12: the split-K GEMVs with their partials added by a second kernel (reduce_kernel:
                  # no program waits on the fixup's membar + atomic + barrier; the ablation put the fixup at ~30% of the
                  # int4 GEMVs' time): the identity tests, per projection, whole 7B int4 / int8 steps, and the fp16 7B
                  # and 1B steps (dense split-K down, and qkv on 1B) (~5 min; `reduceprefill`: the prefill side)
          timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gemv_splitk.py tests/test_gemv_fp8.py \
            tests/test_gemv_dense_splitk.py > "$OUT/reducekernel_tests.log" 2>&1
          echo "split-K tests: rc=$? $(tail -1 "$OUT/reducekernel_tests.log")"
          timeout 60 python3 -m bench.probes.int4_splitk --layout shipped --bits 4 --configs "32,64,4;32,64,4,1" \
            > "$OUT/reducekernel_int4.log" 2>&1; grep "splitk (" "$OUT/reducekernel_int4.log"
          timeout 120 python3 -m bench.probes.packed_plans --quantize int4 --contexts 300,2000 \
            --plans "default;all=32x64x4r;default;all=32x64x4r" > "$OUT/reducekernel_step_int4.md" 2>&1
          echo "int4 steps: rc=$?"; cat "$OUT/reducekernel_step_int4.md"
          timeout 90 python3 -m bench.probes.packed_plans --quantize int8 --contexts 300 \
            --plans "default;qkv=32x128x4r,o=32x128x4r,gate_up=64x128x8r,down=32x256x8r,lm_head=32x128x4r" \
            > "$OUT/reducekernel_step_int8.md" 2>&1
          echo "int8 steps: rc=$?"; cat "$OUT/reducekernel_step_int8.md"
          timeout 150 python3 -m bench.probes.step_variants --models llama-2-7b,llama-3.2-1b --contexts 300 --rounds 5 \
            --variants "fused=0;fused=0,rk=1;fused=0;fused=0,rk=1" > "$OUT/reducekernel_step_fp16.md" 2>&1
          echo "fp16 steps: rc=$?"; cat "$OUT/reducekernel_step_fp16.md" ;;
    reduceprefill) # issues 10 and 12: reduce_kernel on the prefill side, the short-prompt multi-row GEMVs
                   # (RowsConfig.reduce_kernel; issue 12's 10-token TTFT) and the packed prefill GEMM below 128 rows
                   # (GemmConfig.reduce_kernel; issue 10's packed TTFT at 10-50 tokens) (~4 min)
          timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gemv_rows.py tests/test_quant_gemm.py \
            -k "reduce or rows" > "$OUT/reducekernel_rows.log" 2>&1
          echo "rows tests: rc=$? $(tail -1 "$OUT/reducekernel_rows.log")"
          timeout 150 python3 -m bench.probes.prefill_rows --models llama-2-7b,smollm2-135m --buckets 16,32 --reduce \
            > "$OUT/reducekernel_prefill.md" 2>&1
          echo "short-prompt prefill: rc=$?"; cat "$OUT/reducekernel_prefill.md"
          timeout 120 python3 -m bench.probes.lowbit_gemm --tokens 16,32,64 --formats fp16,int4,int8 --reduce \
            > "$OUT/reducekernel_gemm.log" 2>&1
          echo "packed prefill GEMM: rc=$?"; cat "$OUT/reducekernel_gemm.log" ;;
    vearly) # issue 12: the decode attention's V loads issued with its K loads (DecodeAttention(v_early=True): the
            # scores' reductions' barriers otherwise keep V's DRAM latency after K's), the identity test on the card,
            # then whole steps on the 7B, 1B and SmolLM2 shapes at contexts 300 and 2000 (~3 min)
          timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_rope_in_attention.py > "$OUT/vearly_tests.log" 2>&1
          echo "attention tests: rc=$? $(tail -1 "$OUT/vearly_tests.log")"
          timeout 240 python3 -m bench.probes.step_variants --models llama-2-7b,llama-3.2-1b,smollm2-135m \
            --contexts 300,2000 --rounds 5 --variants "fused=0;fused=0,ve=1;fused=0;fused=0,ve=1" \
            > "$OUT/vearly_steps.md" 2>&1
          echo "steps: rc=$?"; cat "$OUT/vearly_steps.md" ;;
    adopt25) # issues 10 and 12: the twenty-fifth session's defaults (reduce_kernel on the int4 / int8 / FP8 split-K
             # plans and the dense split-K projections; v_early below hidden 2048) checked on the card: the packed
             # model and attention tests, SmolLM2's step with each off and on (split combine on, as shipped), and the
             # FP8 step with its split-K projections' partials added by the fixup against the second kernel (~4 min)
          timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_quant_model.py tests/test_rope_in_attention.py \
            tests/test_gemv_dense_splitk.py tests/test_packed_plans.py > "$OUT/adopt25_tests.log" 2>&1
          echo "tests: rc=$? $(tail -1 "$OUT/adopt25_tests.log")"
          timeout 150 python3 -m bench.probes.step_variants --models smollm2-135m --contexts 300,2000 \
            --rounds 5 --variants "ve=0,rk=0;ve=1,rk=0;ve=0,rk=1;ve=1,rk=1" > "$OUT/adopt25_steps.md" 2>&1
          echo "steps: rc=$?"; cat "$OUT/adopt25_steps.md"
          timeout 120 python3 -m bench.probes.packed_plans --quantize fp8 --contexts 300 \
            --plans "default;all=f;default;all=f" > "$OUT/adopt25_fp8.md" 2>&1
          echo "fp8 steps: rc=$?"; cat "$OUT/adopt25_fp8.md" ;;
    dqpass) # issue 10's packed TTFT from 128 rows: bench.probes.dequantize_pass, the dequantizing pass's block
            # configs per slot, int4 and int8 7B (~2 min)
          timeout 300 python3 -m bench.probes.dequantize_pass > "$OUT/dequantize_pass.md" 2>&1
          echo "dequantize_pass: rc=$?"; cat "$OUT/dequantize_pass.md" ;;
    formats) # issue 10: the formats bench alone (the `quant` step without its tests; ~4 min)
          timeout 400 python3 -m launch.cli bench --quiet --model dummy:llama-2-7b --engines hybridrt-executor \
            --workloads floors,decode,ttft,context,memory --prompt-lens 10,50,100,500 --repeats 3 --contexts 512 \
            --context-steps 32 --decode-tokens 128 --decode-prompt-len 50 --timeout 150 \
            --quantize none,int8,int4,fp8 --out "$OUT/formats" > "$OUT/formats.log" 2>&1
          echo "formats bench: rc=$?"; rm -rf "$OUT"/formats/*/logs; cat "$OUT/formats/formats.md" ;;
    gemmlarge) # issue 10: the packed prefill GEMM's larger tiles (LARGE_SWEEP: 64-256 tokens a program, 8 warps,
               # deeper pipelines) against the long-prompt path (dequantize + torch.mm) and fp16 torch.mm at 128 and
               # 512 tokens, int4 and int8 (~6 min)
          timeout 540 python3 -m bench.probes.lowbit_gemm --tokens 128,512 --formats fp16,int4,int8 --sweep \
            --sweep-set large --dequant --reps 10 --out "$OUT/gemmlarge" > "$OUT/gemmlarge.log" 2>&1
          echo "large-tile sweep: rc=$?"; cat "$OUT/gemmlarge.log" ;;
    fp8mm) # issue 10: FP8 prefill on the FP8 tensor cores (kernels/fp8_scaled_mm.py, W8A8 with per-token
           # activation scales) against the default packed prefill and fp16, whole prefill steps at 16-500 tokens,
           # then its tests on the card, then the low-bit GEMM's large tiles on FP8 codes (W8A16) (~5 min)
          timeout 240 python3 -m bench.probes.fp8_prefill > "$OUT/fp8mm.md" 2>&1
          echo "fp8 prefill: rc=$?"; cat "$OUT/fp8mm.md"
          timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_fp8_scaled_mm.py > "$OUT/fp8mm_tests.log" 2>&1
          echo "tests: rc=$? $(tail -1 "$OUT/fp8mm_tests.log")"
          # W16A8 kept: FP8 codes converted in the low-bit GEMM's tiles (cheap for e4m3), with the large tiles
          timeout 200 python3 -m bench.probes.lowbit_gemm --tokens 128,512 --formats fp16,fp8 --sweep --sweep-set large \
            --dequant --reps 10 > "$OUT/fp8mm_gemm.log" 2>&1
          echo "fp8 large-tile sweep: rc=$?"; cat "$OUT/fp8mm_gemm.log" ;;
    resweep) # issue 10: the int8 and FP8 split-K blocks again now that the second kernel adds the partials (their
             # blocks were chosen under the fixup; int4 gained 2.5% from a longer K slice), whole 7B steps; the fp8
             # format runs Fp8Config on gate_up only (down, embedding and lm_head are int8 there) (~3 min)
          timeout 120 python3 -m bench.probes.packed_plans --quantize int8 --contexts 300 --rounds 5 --plans \
            "default;all=32x256x4r;all=64x128x4r;gate_up=32x256x8r,down=32x512x8r;qkv=32x256x4r,o=32x256x4r;default" \
            > "$OUT/resweep_int8.md" 2>&1
          echo "int8: rc=$?"; cat "$OUT/resweep_int8.md"
          timeout 120 python3 -m bench.probes.packed_plans --quantize fp8 --contexts 300 --rounds 5 --plans \
            "default;gate_up=32x1024x4r;gate_up=64x1024x8r;gate_up=64x512x8r;gate_up=128x512x8r;default" \
            > "$OUT/resweep_fp8.md" 2>&1
          echo "fp8: rc=$?"; cat "$OUT/resweep_fp8.md" ;;
    earlypacked) # issue 10: the packed formats' GEMVs load their codes and scales before the PDL wait
                 # (FusedDecoder(early_weights=True)): whole 7B steps per format, alternating rounds (~4 min)
          for q in int4 int8 fp8; do
            timeout 150 python3 -m bench.probes.step_variants --quantize $q --models llama-2-7b --contexts 300,2000 \
              --variants "fused=0;fused=0,early=1;fused=0;fused=0,early=1" --rounds 5 > "$OUT/early_$q.md" 2>&1
            echo "early weights $q: rc=$?"; cat "$OUT/early_$q.md"
          done ;;
    gpuidle) # issues 12/13: is a step slower on the card after idle (bench.probes.gpu_idle, one process, graphs),
             # and where the int4 7B decode step's time goes kernel by kernel (eager launches; ~3 min)
          timeout 200 python3 -m bench.probes.gpu_idle --repeats 5 > "$OUT/gpu_idle.md" 2>&1
          echo "gpu idle: rc=$?"; cat "$OUT/gpu_idle.md"
          timeout 200 python3 -m bench.probes.kernel_profile --model dummy:llama-2-7b --quantize int4 --context 300 \
            --prompt 100 --steps 20 --top 20 > "$OUT/kernel_profile_int4.md" 2>&1
          echo "kernel profile int4: rc=$?"; cat "$OUT/kernel_profile_int4.md" ;;
    startupspin) # issue 13: the first request after ready, with and without a process spinning on one core of the
                 # host meanwhile (is the first request's extra time the host CPU's idle states?) (~2 min)
          for v in plain spin plain2 spin2; do
            spinner=""; case $v in spin*) python3 -c "while True: pass" & spinner=$!;; esac
            first_requests "startup_$v" 150; [ -n "$spinner" ] && kill $spinner
          done ;;
    idlegap) # issue 13: a request after each idle gap, its TTFT split (the JIT context's queue, until the executor
             # had the prefill queued, the rest) on the SmolLM2 shape (bench.probes.idle_gap; ~1.5 min)
          idle_gap idle_gap 200 ;;
    wake) # issues 12/13: the doorbell's wake pipe (an idle executor woken by one byte, not the ZeroMQ copy): the
          # idle-gap split, the bench's first requests after ready, and the cuda tests of the paths it touches (~5 min)
          idle_gap idle_gap_wake 200
          first_requests startup_wake 150
          timeout 240 python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_gpu_path.py tests/test_speculative.py \
            tests/test_process_lifetime.py tests/test_runtime_batching.py tests/test_prefix_reuse.py \
            > "$OUT/wake_tests.log" 2>&1
          echo "cuda tests: rc=$? $(tail -1 "$OUT/wake_tests.log")" ;;
    wake2) # issues 12/13: the request's arrival wakes the executor (RemoteExecutor.wake_early): the idle-gap split,
           # the bench's first requests after ready, the speculative cuda tests (doorbell steps) (~3 min)
          idle_gap idle_gap_wake2 100
          first_requests startup_wake2 80
          timeout 70 python3 -m pytest -q -x -m cuda -p no:cacheprovider tests/test_speculative.py \
            > "$OUT/wake2_tests.log" 2>&1
          echo "cuda tests: rc=$? $(tail -1 "$OUT/wake2_tests.log")" ;;
    startup13) # issue 13: serve's ready time against the host's floor (a fresh `import torch` + CUDA context, timed
               # before each start), 4 fresh serves of the SmolLM2 shape with its tokenizer, then the bench's startup
               # workload (phases per process, the first 5 requests after ready against steady state) twice (~3 min)
          timeout 200 python3 -m bench.probes.serve_ready --runs 4 --json "$OUT/serve_ready.json" -- \
            --model dummy:smollm2-135m --tokenizer "$HYBRIDRT_TEST_TOKENIZER" --device cuda > "$OUT/serve_ready.log" 2>&1
          echo "serve_ready: rc=$?"; head -7 "$OUT/serve_ready.log"; grep -E "^hybridrt serving|^  (graph_executor|jit_context): [a-z]" "$OUT/serve_ready.log" | grep -v request | head -24
          for i in 1 2; do
            timeout 150 python3 -m launch.cli bench --quiet --model dummy:smollm2-135m --tokenizer "$HYBRIDRT_TEST_TOKENIZER" \
              --engines hybridrt --workloads startup,ttft --prompt-lens 10,100 --repeats 5 --out "$OUT/startup_$i" \
              > "$OUT/startup_$i.log" 2>&1
            echo "bench startup $i: rc=$?"  # logs kept (the servers' request lines)
            grep -A12 "^## Start-up" "$OUT/startup_$i/results.md"; grep -A8 "^## TTFT" "$OUT/startup_$i/results.md"
          done ;;
    dqrows) # issue 10: where each packed format's prefill should leave the low-bit GEMM for dequantize + cuBLAS
            # (projections.DequantizeRows): whole 7B prefill steps, 128-512 tokens, both paths per format (~3 min)
          timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_quant_gemm.py -k "dequantize_rows or long" \
            > "$OUT/dqrows_tests.log" 2>&1
          echo "tests: rc=$? $(tail -1 "$OUT/dqrows_tests.log")"
          timeout 400 python3 -m bench.probes.dequantize_rows > "$OUT/dqrows.md" 2>&1
          echo "dequantize rows: rc=$?"; cat "$OUT/dqrows.md" ;;
    dqadopt) # issue 10: DEQUANTIZE_ROWS per format adopted (int8 160, FP8 224): the packed tests on the card, the
             # probe at the new switch points, then the formats bench with prompts on both sides of them (~6 min)
          timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_quant_model.py tests/test_quant_gemm.py \
            tests/test_fp8_scaled_mm.py > "$OUT/dqadopt_tests.log" 2>&1
          echo "tests: rc=$? $(tail -1 "$OUT/dqadopt_tests.log")"
          timeout 150 python3 -m bench.probes.dequantize_rows --quantize int8,fp8 --tokens 160,224 > "$OUT/dqadopt.md" 2>&1
          echo "dequantize rows: rc=$?"; cat "$OUT/dqadopt.md"
          timeout 300 python3 -m launch.cli bench --quiet --model dummy:llama-2-7b --engines hybridrt-executor \
            --workloads floors,decode,ttft --prompt-lens 10,100,128,192,256,500 --repeats 3 \
            --decode-tokens 128 --decode-prompt-len 50 --timeout 150 \
            --quantize none,int8,int4,fp8 --out "$OUT/formats" > "$OUT/formats.log" 2>&1
          echo "formats bench: rc=$?"; rm -rf "$OUT"/formats/*/logs; cat "$OUT/formats/formats.md"
          for f in float16 int8 int4 fp8; do echo "$f"; grep -A9 "^## TTFT" "$OUT/formats/$f/results.md" | tail -7; done ;;
    ws) # issue 10: the warp-specialized int4 prefill GEMM probe, --check then the sweep (tools/ws_session.sh; carry
        # .ptxas as well: ptxas 13.4, bench/NOTES.md item 1c; ~40 s)
          bash tools/ws_session.sh ;;
    smem) # issue 10: the one-role shared-memory Gluon GEMM probe, --check, sweep, two stall profiles
          # (tools/smem_session.sh; carry .ptxas; ~60 s)
          bash tools/smem_session.sh ;;
    stream) # issue 10: the streaming decode GEMV probe against the split-K one, a process per config
            # (tools/stream_sweep.sh; ~90 s)
          bash tools/stream_sweep.sh ;;
    persistent) # issue 10: the split-K GEMV's tiles taken by a persistent grid in a cp.async-pipelined loop
                # (bench.probes.persistent_splitk) against the shipped kernel per 7B projection, int4 then int8 (~4 min)
          timeout 300 python3 -m bench.probes.persistent_splitk --check > "$OUT/persistent_int4.md" 2> "$OUT/persistent_int4.err"
          echo "int4: rc=$?"; grep '^| ' "$OUT/persistent_int4.md"; tail -3 "$OUT/persistent_int4.err"
          timeout 200 python3 -m bench.probes.persistent_splitk --bits 8 --layout tiled --configs \
            32x128x4x3x0,32x128x4x3x396,32x128x8x3x132 > "$OUT/persistent_int8.md" 2> "$OUT/persistent_int8.err"
          echo "int8: rc=$?"; grep '^| ' "$OUT/persistent_int8.md" | cut -d'|' -f2-6 ;;
    prefill200) # issue 12: the 7B fp16 prefill GEMMs at 100-500 tokens in four cuBLAS formulations
                # (bench.probes.prefill_gemm), then bench.probes.kernel_profile of the 200- and 500-token prefills (~3 min)
          timeout 200 python3 -m bench.probes.prefill_gemm > "$OUT/prefill_gemm.md" 2>&1; echo "prefill_gemm rc=$?"
          tail -8 "$OUT/prefill_gemm.md"
          for p in 200 500; do
            timeout 150 python3 -m bench.probes.kernel_profile --context 512 --prompt $p --steps 10 --top 20 \
              > "$OUT/profile_prefill$p.md" 2>&1; echo "profile $p rc=$?"
            sed -n '/### prefill/,$p' "$OUT/profile_prefill$p.md" | head -26; tail -2 "$OUT/profile_prefill$p.md"
          done ;;
    rope) # issue 12: rope_append with a block of heads a program: its tests on the card, the kernel alone by heads a
          # program (bench.probes.rope_rows), the 200-token prefill's profile after it, and the bucket padding's cost
          # (bench.probes.prefill_buckets) (~4 min)
          timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k rope tests/test_rope_in_attention.py \
            > "$OUT/rope_tests.log" 2>&1; echo "rope tests: rc=$? $(tail -1 "$OUT/rope_tests.log")"
          timeout 120 python3 -m bench.probes.rope_rows > "$OUT/rope_rows.md" 2>&1; echo "rope_rows rc=$?"; cat "$OUT/rope_rows.md"
          timeout 150 python3 -m bench.probes.kernel_profile --context 512 --prompt 200 --steps 10 --top 12 \
            > "$OUT/profile_prefill200_rope.md" 2>&1; echo "profile rc=$?"
          grep -E 'rope|prefill of|graph replays' "$OUT/profile_prefill200_rope.md" | head -5
          timeout 240 python3 -m bench.probes.prefill_buckets > "$OUT/prefill_buckets.md" 2>&1; echo "buckets rc=$?"
          tail -8 "$OUT/prefill_buckets.md" ;;
    buckets) # issue 12: the finer prefill buckets and the bucket choice by measured replay time: the graph tests on
             # the card, prefill_buckets (default buckets against exact rows), then the executor and two-process
             # engines' TTFT at 10-500 tokens and decode (~5 min)
          timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_path.py -k "graph or capture or chunked \
            or bucket or continuing" tests/test_buckets.py > "$OUT/bucket_tests.log" 2>&1
          echo "bucket tests: rc=$? $(tail -1 "$OUT/bucket_tests.log")"
          timeout 200 python3 -m bench.probes.prefill_buckets > "$OUT/prefill_buckets.md" 2>&1; echo "buckets rc=$?"
          tail -8 "$OUT/prefill_buckets.md"
          timeout 420 python3 -m launch.cli bench --quiet --engines hybridrt,hybridrt-executor --workloads ttft,decode,floors \
            --prompt-lens 10,25,50,100,200,300,400,500 --out "$OUT/run" > "$OUT/bench.log" 2>&1
          echo "bench: rc=$?"; rm -rf "$OUT/run/logs" ;;
    execargmax) # issue 12 target 2: the executor's greedy token (Decode.argmax, EXECUTOR_ARGMAX_GPU, on since the
                # 40th session) on the card: its tests, then the bench's decode on dummy:smollm2-135m with it off (a
                # copy of the tree with the constant flipped) and on, three alternating rounds, two processes and the
                # executor (~5 min)
          timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_argmax.py tests/test_executor_argmax.py \
            tests/test_decode_ahead.py tests/test_gpu_path.py > "$OUT/execargmax_tests.log" 2>&1
          echo "executor argmax tests: rc=$? $(tail -1 "$OUT/execargmax_tests.log")"
          tree_copy /tmp/off
          sed -i 's/^EXECUTOR_ARGMAX_GPU = True/EXECUTOR_ARGMAX_GPU = False/' /tmp/off/jit_context/generator.py
          decode_ab ea off /tmp/off ;;
    residualearly) # GemvConfig.residual_early (o_proj's residual rows read right after the wait; same bits): its
                   # test, then the step on SmolLM2, 1B and 7B with and without, alternating rounds (~3 min)
          timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_pending_residual.py > "$OUT/re_tests.log" 2>&1
          echo "residual_early tests: rc=$? $(tail -1 "$OUT/re_tests.log")"
          timeout 240 python3 -m bench.probes.step_variants --models smollm2-135m,llama-3.2-1b,llama-2-7b \
            --contexts 300,2000 --rounds 7 --variants "fused=1;re=1;fused=1;re=1" > "$OUT/re_steps.md" 2>&1
          echo "residual_early steps: rc=$?"; cat "$OUT/re_steps.md" ;;
    kvearly) # issue 12 target 2: the decode attention loads its keys and values before its PDL wait
             # (DecodeAttention(kv_early=); on for the small models since the 41st session): its tests (the interpreter cases compiled, and SmolLM2's and 7B's
             # production steps eager and graphed, bit for bit), then the step on SmolLM2 and 7B with and without,
             # alternating rounds (7B also on 4 warps: on its 2 the early tiles take 255 registers; ~4 min)
          timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_rope_in_attention.py > "$OUT/kve_tests.log" 2>&1
          echo "kv_early tests: rc=$? $(tail -1 "$OUT/kve_tests.log")"; grep -E "^FAILED|Error" "$OUT/kve_tests.log" | head -5
          timeout 150 python3 -m bench.probes.step_variants --models smollm2-135m --contexts 300,2000 --rounds 7 \
            --variants "fused=1;kve=1;fused=1;kve=1" > "$OUT/kve_steps.md" 2>&1
          echo "kv_early steps: rc=$?"; cat "$OUT/kve_steps.md"
          timeout 150 python3 -m bench.probes.step_variants --models llama-2-7b --contexts 300,2000 --rounds 5 \
            --variants "fused=0;kve=1,fused=0;warps=4,fused=0;kve=1,warps=4,fused=0;fused=0" > "$OUT/kve_steps_7b.md" 2>&1
          echo "kv_early steps 7B: rc=$?"; cat "$OUT/kve_steps_7b.md" ;;
    kvearlyab) # the bench's SmolLM2 decode with kv_early off (a copy of the tree: the hidden-0 StepOptions without
               # it; on there since the 41st session) against the tree as it is, three alternating rounds, two
               # processes and the executor
          tree_copy /tmp/kve
          sed -i -e 's/defer_down=True, kv_early=True))/defer_down=True))/' /tmp/kve/graph_executor/kernels/decode_plan.py
          echo "patched: $(grep -c 'defer_down=True))' /tmp/kve/graph_executor/kernels/decode_plan.py)"
          decode_ab kve off /tmp/kve ;;
    kvearly2) # kv_early where it is off (measured on 7B only before the early return of empty splits): 7B and
              # Llama-3-8B on their 2 warps, on 4, and with splits of 32 (half the tiles' registers); Llama-3.2-1B with
              # RoPE moved inside for it (rope=1; its plan keeps RoPE outside), with and without the split combine;
              # all three with the position read before the wait alone (ep=1, DecodeAttention(early_position=));
              # alternating rounds at a 4096-position cache (~6 min)
          timeout 300 python3 -m bench.probes.step_variants --models llama-2-7b,llama-3-8b --contexts 300,2000 \
            --rounds 5 --variants "fused=0;kve=1,fused=0;kve=1,warps=4,fused=0;kve=1,split=32,fused=0;split=32,fused=0;ep=1,fused=0;fused=0" \
            > "$OUT/kve2_steps_7b.md" 2>&1
          echo "kv_early steps 7B / 8B: rc=$?"; cat "$OUT/kve2_steps_7b.md"
          timeout 150 python3 -m bench.probes.step_variants --models llama-3.2-1b --contexts 300,2000 --rounds 5 \
            --variants "fused=0;ep=1,fused=0;rope=1,fused=0;rope=1,kve=1,fused=0;rope=1,kve=1;fused=0" > "$OUT/kve2_steps_1b.md" 2>&1
          echo "kv_early steps 1B: rc=$?"; cat "$OUT/kve2_steps_1b.md" ;;
    target1) # issue 12 target 1's bench run: decode P50 against the floor at contexts 128 / 512 / 2048 on the 7B,
             # Llama-3-8B and Llama-3.2-1B shapes, two processes and the executor (~6 min)
          for m in ${T1_MODELS:-llama-2-7b llama-3-8b llama-3.2-1b}; do  # (T1_MODELS: a subset)
            timeout 170 python3 -m launch.cli bench --quiet --model "dummy:$m" --engines hybridrt,hybridrt-executor \
              --workloads context,floors --contexts 128,512,2048 --max-context 4096 --out "$OUT/t1_$m" > "$OUT/t1_$m.log" 2>&1
            echo "$m: rc=$?"; grep -E "^\| (128|512|2048) \||P50 at context" "$OUT/t1_$m/results.md"
          done ;;
    smolreal) # issue 12 target 2 on the real weights: the SmolLM2 GGUF (HYBRIDRT_TEST_GGUF) dequantized to fp16 at
              # load, the bench's decode through two processes and the executor, three runs, max context 512 and 4096
              # (~3 min)
          for mc in 512 4096; do for i in 1 2 3; do
            timeout 100 python3 -m launch.cli bench --quiet --model "$HYBRIDRT_TEST_GGUF" --dequantize \
              --engines hybridrt,hybridrt-executor --workloads decode --max-context $mc --out "$OUT/real_${mc}_$i" \
              > "$OUT/real_${mc}_$i.log" 2>&1
            echo "real $mc $i: rc=$? $(grep -E '^\| hybridrt' "$OUT/real_${mc}_$i.log" | head -2 | cut -d'|' -f2,3,5,7 | tr '\n' ' ')"
          done; done ;;
    kvearlyint4) # issue 10: the attention's early position and early keys / values on the int4 7B step (attention
                 # is ~10% of its 1.77 ms), o_proj and down_proj tile-major as shipped (tile=2), alternating rounds
                 # (~3 min)
          timeout 250 python3 -m bench.probes.step_variants --models llama-2-7b --quantize int4 --contexts 300,2000 \
            --rounds 5 --variants "fused=0,tile=2;ep=1,fused=0,tile=2;kve=1,warps=4,fused=0,tile=2;kve=1,split=32,fused=0,tile=2;fused=0,tile=2" \
            > "$OUT/kve_int4_steps.md" 2>&1
          echo "int4 steps: rc=$?"; cat "$OUT/kve_int4_steps.md" ;;
    onebkve) # Llama-3.2-1B with RoPE inside the attention and its keys and values loaded before the wait (42nd
             # session's step_variants: -2.6% / -1.3% at context 300 / 2000): the bench's decode at max context 4096
             # with it on in a copy of the tree (1B's StepOptions) against the tree as it is, three alternating rounds,
             # then the step at 128 / 300 / 2000, 7 rounds, also with the split combine and a 512 bucket's grid
             # (the 128 / 300 rows), and the decode on the verify step's rows kernel (GQA 4: a K / V tile read once
             # for the group's four queries; RoPE outside, as 1B had it then; ~6 min)
          # (adopted in the 46th session: the tree has these options now, the patch below finds nothing; kept as the
          # record, refused so that it cannot A/B two identical trees)
          echo "onebkve: adopted in the 46th session, nothing to A/B (see adopt1b)"; continue
          tree_copy /tmp/onebkve
          sed -i -e 's/(2048, StepOptions(fuse_rope=False, early_weights=False))/(2048, StepOptions(fuse_rope=True, early_weights=False, kv_early=True))/' \
            /tmp/onebkve/graph_executor/kernels/decode_plan.py
          echo "patched: $(grep -c 'early_weights=False, kv_early=True))' /tmp/onebkve/graph_executor/kernels/decode_plan.py)"
          decode_ab onebkve on /tmp/onebkve llama-3.2-1b 4096
          timeout 150 python3 -m bench.probes.step_variants --models llama-3.2-1b --contexts 128,300,2000 --rounds 7 \
            --variants "fused=0;rope=1,kve=1,fused=0;rope=1,kve=1;rope=1,kve=1,fused=0,ctx=512;rope=0,rows=1,fused=0;fused=0" \
            > "$OUT/onebkve_steps.md" 2>&1
          echo "1B steps: rc=$?"; cat "$OUT/onebkve_steps.md" ;;
    pipeattn) # issue 12 target 1 at 2048: the 7B's attention reads its K / V at ~2-2.4 TB/s at long contexts (the step
              # grows 0.39 ms from context 128 to 2048 for 0.24 ms of floor); splits of 128 / 256 positions with their
              # loop over blocks software-pipelined (DecodeAttention(loop_stages=), cp.async), against the shipped
              # one-block splits, 7B and 8B at 300 / 2000, 5 alternating rounds, its same-bits test first; then the
              # decode on the verify step's rows kernel (~6 min)
          timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_rope_in_attention.py -k pipelined \
            > "$OUT/pipe_tests.log" 2>&1; echo "pipelined tests: rc=$? $(tail -1 "$OUT/pipe_tests.log")"
          timeout 300 python3 -m bench.probes.step_variants --models llama-2-7b,llama-3-8b --contexts 300,2000 --rounds 5 \
            --variants "fused=0;split=128,warps=4,ls=2,fused=0;split=256,warps=4,ls=2,fused=0;split=256,warps=4,ls=3,fused=0;split=128,warps=2,ls=2,fused=0;split=128,warps=4,fused=0;fused=0" \
            > "$OUT/pipe_steps.md" 2>&1
          echo "pipelined attention steps: rc=$?"; cat "$OUT/pipe_steps.md"
          # and the decode on the verify step's kernel (tensor-core rows: 8B's four query heads a K / V tile at once),
          # RoPE outside as it needs, against RoPE outside on the one-query kernel
          timeout 200 python3 -m bench.probes.step_variants --models llama-2-7b,llama-3-8b --contexts 300,2000 --rounds 5 \
            --variants "fused=0;rope=0,fused=0;rope=0,rows=1,fused=0;fused=0" > "$OUT/rows_steps.md" 2>&1
          echo "rows-kernel decode steps: rc=$?"; cat "$OUT/rows_steps.md" ;;
    ctxtests) # the decode graphs per context bucket and the split combine's count after a warm-up past a bucket's
              # grid (fixed after the 42nd session's device time): their tests with the executor's argmax graphs and
              # the RoPE-inside attention's, then test_gpu_path's graph tests (~3 min)
          timeout 250 python3 -m pytest -q -p no:cacheprovider tests/test_decode_contexts.py tests/test_executor_argmax.py \
            tests/test_rope_in_attention.py > "$OUT/ctx_tests.log" 2>&1; echo "ctx tests: rc=$? $(tail -1 "$OUT/ctx_tests.log")"
          timeout 150 python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_gpu_path.py -k "graph or capture or argmax" \
            > "$OUT/ctx_gpu_path.log" 2>&1; echo "gpu_path graph tests: rc=$? $(tail -1 "$OUT/ctx_gpu_path.log")" ;;
    gateupsk) # the largest projection on the dense split-K kernels (never measured: the dense split-K probes swept
              # qkv, o and down): Llama-3.2-1B's gate_up reads at ~3.3 TB/s against 7B's ~4.0 (its 20 us kernel's ramp
              # and tail); its lm_head (525 MB, 22% of the step's bytes) on wider rows and on split-K; its o_proj (~1.9
              # TB/s) on 1 / 4 rows of 2048 and 2 of 1024; 7B's and 8B's gate_up on down's split-K config and their
              # lm_head (8B's 1 GB of vocabulary) on split-K and wider rows; 5 alternating rounds at 300 (~6 min)
          timeout 200 python3 -m bench.probes.step_variants --models llama-3.2-1b --contexts 300 --rounds 5 \
            --variants "fused=0;fused=0,gate_up=s16x256x4;fused=0,gate_up=s32x256x8;fused=0,gate_up=s16x512x4;fused=0,gate_up=s32x512x8;fused=0,gate_up=s64x256x8;fused=0,lm_head=32x512x8;fused=0,lm_head=s32x512x8;fused=0,lm_head=s64x1024x8;fused=0,re=1,o=1x2048x4;fused=0,re=1,o=4x2048x4;fused=0,re=1,o=2x1024x4;fused=0" \
            > "$OUT/gateupsk_1b.md" 2>&1; echo "1B gate_up / lm_head: rc=$?"; cat "$OUT/gateupsk_1b.md"
          timeout 250 python3 -m bench.probes.step_variants --models llama-2-7b,llama-3-8b --contexts 300 --rounds 5 \
            --variants "fused=0;fused=0,gate_up=s16x1024x8;fused=0,gate_up=s32x512x8;fused=0,lm_head=s32x1024x8;fused=0,lm_head=32x512x8;fused=0" \
            > "$OUT/gateupsk_7b.md" 2>&1; echo "7B / 8B gate_up / lm_head: rc=$?"; cat "$OUT/gateupsk_7b.md" ;;
    gridpad) # why fewer attention programs made the 7B / 8B step slower (42nd session: a grid for 1024 positions
             # +3.3%, early_position +1.3..3.9%): the step with more programs than the cache's splits (ctx past the
             # cache: 2x and 4x the 2,048 programs, all the extra ones finding no keys) and fewer (512 / 1024 / 2048
             # positions), 7B and 8B at 300 / 2000, 5 alternating rounds (~3 min)
          timeout 200 python3 -m bench.probes.step_variants --models llama-2-7b,llama-3-8b --contexts 300 --rounds 5 \
            --variants "fused=0;fused=0,ctx=8192;fused=0,ctx=16384;fused=0,ctx=512;fused=0,ctx=1024;fused=0,ctx=2048;fused=0" \
            > "$OUT/gridpad_300.md" 2>&1; echo "gridpad 300: rc=$?"; cat "$OUT/gridpad_300.md"
          timeout 150 python3 -m bench.probes.step_variants --models llama-2-7b,llama-3-8b --contexts 2000 --rounds 5 \
            --variants "fused=0;fused=0,ctx=8192;fused=0,ctx=16384;fused=0,ctx=2048;fused=0" \
            > "$OUT/gridpad_2000.md" 2>&1; echo "gridpad 2000: rc=$?"; cat "$OUT/gridpad_2000.md" ;;
    wayin) # issue 12 target 4, the native client's TTFT over the executor's (43rd session, CPU-measured only: a
           # request's Reset rung on the doorbell with nothing waiting for it, where the serving loop used to wait for
           # its Ok over ZeroMQ while a back-to-back client's next request came in; and the JIT context's idle spin,
           # ServerConfig.jit_idle_spin_ms, off by default): bench.probes.e2e_probe --prompts 10,100,500 on SmolLM2's
           # shape with the idle spin 0 and 20 ms, this tree against a copy whose Reset waits as before, two
           # alternating rounds; then client_spin (the way in split at the JIT context's wake) with the idle spin 0
           # and 20 (~6 min; its sub-commands' limits add up to 500 s); the 7B shape: `wayin7b`
          tree_copy /tmp/sync
          python3 - <<'PY' || exit 1
p = "/tmp/sync/jit_context/remote_executor.py"
s = open(p).read()
old = "if self.doorbell is not None and self.doorbell.ring(reset) is not None:"
assert old in s, "the rung Reset is not where the A/B expects it"
open(p, "w").write(s.replace(old, "if False:  # the synchronous Reset, for the A/B"))
PY
          for i in 1 2; do for t in sync rung; do d=$PWD; [ $t = sync ] && d=/tmp/sync
            (cd "$d" && PYTHONPATH=/tmp/site:$d timeout 100 python3 -m bench.probes.e2e_probe --model dummy:smollm2-135m \
              --prompts 10,100,500 --repeats 15 --idle-spin-ms 0,20 > "$OUT/wayin_e2e_${t}_$i.md" 2>&1)
            echo "e2e SmolLM2 shape, $t $i: rc=$?"; tail -6 "$OUT/wayin_e2e_${t}_$i.md" | cut -d'|' -f2,3,5-9
          done; done
          for spin in 0 20; do
            timeout 50 python3 -m bench.probes.client_spin --model dummy:smollm2-135m --device cuda --requests 15 \
              --tokens 16 --idle-spin-ms $spin > "$OUT/wayin_cs_$spin.md" 2>&1
            echo "client_spin, idle spin $spin: rc=$?"; sed -n 3,6p "$OUT/wayin_cs_$spin.md" | cut -d'|' -f2-7
          done ;;
    peerar) # issue 15's one-kernel all-reduce over peer memory on one GPU (44th session, CPU-tested under the
            # interpreter only): two processes on one device through CUDA IPC (the kernel compiled for sm_90, the
            # release / acquire flags across processes) (~1 min)
          timeout 120 python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_peer_allreduce.py > "$OUT/peerar.log" 2>&1
          echo "peer all-reduce: rc=$? $(tail -1 "$OUT/peerar.log")" ;;
    jitfeatures) # the 44th and 45th sessions' sampling features on a GPU (built on the CPU machine): logprobs through
                 # the token reader's pinned extra values, penalties and logit bias in the sampler, structured output's
                 # mask (pinned words copied up per draw; needs the llguidance wheel in .whl, manylinux_2_31: see
                 # bench/NOTES.md's device recipe), the cuda tests of test_logprobs, test_sampling,
                 # test_structured_output and test_executor_argmax, and test_batching (~2 min)
          timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_logprobs.py tests/test_sampling.py \
            tests/test_executor_argmax.py tests/test_batching.py > "$OUT/jitfeatures.log" 2>&1
          echo "sampling features: rc=$? $(tail -1 "$OUT/jitfeatures.log")"
          # (-m cuda: its CPU tests need the default model package, which the card's machine has not got)
          timeout 100 python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_structured_output.py \
            > "$OUT/structured.log" 2>&1
          echo "structured output on the card: rc=$? $(tail -1 "$OUT/structured.log")" ;;
    structcost) # structured output's cost a token on the card (45th session, measured on the CPU only; predicted: a
                # structured request loses decode_ahead 2, SmolLM2 ~2,300 against ~2,650 tokens/s): plain greedy
                # against a regex that runs to max_tokens and a JSON string, SmolLM2's shape with its tokenizer, the
                # batch-1 loop then the batch engine (needs the llguidance wheel; ~2 min)
          for seqs in 1 4; do
            timeout 100 python3 -m bench.probes.structured_cost --model dummy:smollm2-135m \
              --tokenizer "$HYBRIDRT_TEST_TOKENIZER" --device cuda --requests 15 --max-num-seqs $seqs \
              > "$OUT/structcost_$seqs.md" 2>&1
            echo "structured output's cost, $seqs slots: rc=$?"; tail -5 "$OUT/structcost_$seqs.md"
          done ;;
    wayin7b) # wayin's TTFT split on the 7B shape (target 4's own model), this tree, the JIT context's idle spin 0
             # and 20 ms (~3 min)
          timeout 220 python3 -m bench.probes.e2e_probe --model dummy:llama-2-7b --prompts 10,100,500 --repeats 15 \
            --idle-spin-ms 0,20 > "$OUT/wayin_e2e_7b.md" 2>&1
          echo "e2e 7B shape: rc=$?"; tail -6 "$OUT/wayin_e2e_7b.md" | cut -d'|' -f2,3,5-9 ;;
    promptlp) # prompt log-probabilities (47th session, built on the CPU machine): the scoring step on GraphRunner
              # and the decode graphs after it, the cuda tests of test_prompt_logprobs, then its cost (~3 min)
          timeout 120 python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_prompt_logprobs.py \
            > "$OUT/promptlp.log" 2>&1; echo "prompt logprobs cuda tests: rc=$? $(tail -1 "$OUT/promptlp.log")"
          # what scoring costs against a plain prefill (one token generated), SmolLM2's and the 7B's shapes (~2 min)
          for m in smollm2-135m llama-2-7b; do
            timeout 150 python3 -m bench.probes.prompt_scoring --model "dummy:$m" --lengths 100,500,2000 --requests 5 \
              > "$OUT/promptlp_$m.md" 2>&1; echo "prompt scoring $m: rc=$?"; tail -4 "$OUT/promptlp_$m.md"
          done ;;
    adopt1b) # issue 12 targets 1 / 2 (46th session): Llama-3.2-1B's gate_up on split-K 16x256 and RoPE inside with its
             # keys and values loaded early, adopted from gateupsk / onebkve: their tests on the card, the 1B step
             # (the new production step against the old plan and options, each half alone), then target1 on 1B (~4 min)
          timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_pending_residual.py tests/test_gemv_dense_splitk.py \
            tests/test_rope_in_attention.py -k "production or gate_up or pending or plan or options or splitk" \
            > "$OUT/adopt1b_tests.log" 2>&1; echo "1B adoption tests: rc=$? $(tail -1 "$OUT/adopt1b_tests.log")"
          timeout 150 python3 -m bench.probes.step_variants --models llama-3.2-1b --contexts 128,300,2000 --rounds 5 \
            --variants "fused=0;rope=0,kve=0,gate_up=16x256x4x3,fused=0;rope=0,kve=0,fused=0;gate_up=16x256x4x3,fused=0;fused=0" \
            > "$OUT/adopt1b_steps.md" 2>&1; echo "1B steps: rc=$?"; cat "$OUT/adopt1b_steps.md"
          timeout 170 python3 -m launch.cli bench --quiet --model dummy:llama-3.2-1b --engines hybridrt,hybridrt-executor \
            --workloads context,floors --contexts 128,512,2048 --max-context 4096 --out "$OUT/t1_llama-3.2-1b" \
            > "$OUT/t1_llama-3.2-1b.log" 2>&1
          echo "llama-3.2-1b: rc=$?"; grep -E "^\| (128|512|2048) \||P50 at context" "$OUT/t1_llama-3.2-1b/results.md" ;;
    structab) # structured output's token gap (46th session: 0.72 ms against the 45th's 0.46 on the same probe): this
              # tree (pristine matchers kept and copied) against the 45th session's grammar_mask.py (struct_ab), two
              # alternating rounds, batch-1 (~2 min)
          struct_ab structab 2 15 80 ;;
    mini46) # adopt1b and structab in ~3 min, for a short budget: the 1B adoption's tests on the card, then mini46b
          timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_pending_residual.py \
            tests/test_gemv_dense_splitk.py tests/test_rope_in_attention.py -k "production or gate_up or plan or options" \
            > "$OUT/mini46_tests.log" 2>&1; echo "1B adoption cuda tests: rc=$? $(tail -1 "$OUT/mini46_tests.log")"
          ;&  # (on into mini46b)
    mini46b) # mini46 without its tests (~2 min): the 1B step against the old options (3 rounds, contexts 300 / 2000),
             # one old / new round of the structured-output cost
          timeout 80 python3 -m bench.probes.step_variants --models llama-3.2-1b --contexts 300,2000 --rounds 3 \
            --variants "fused=0;rope=0,kve=0,gate_up=16x256x4x3,fused=0;fused=0" \
            > "$OUT/mini46_steps.md" 2>&1; echo "1B steps: rc=$?"; tail -7 "$OUT/mini46_steps.md"
          struct_ab mini46_struct 1 8 50 ;;
    *) echo "unknown step $step (tests, bench, probe, profile, quant, gemm, gemv, fp8, batching, batchbench, attention, neartie, http, startup, hops, spec, densesplitk, densesplitk1b, localstream, clientspin, httpab, stepfusions, stepdefaults, hfeager, prefetch, shortsteps, shortsteps2, shortrows, shortab, gguftests, verifyrows, ncu, packedplans, reducekernel, reduceprefill, vearly, adopt25, formats, gemmlarge, fp8mm, resweep, startup13, dqrows, dqadopt, ws, smem, stream, persistent, prefill200, rope, buckets, execargmax, residualearly, kvearly, kvearlyab, kvearly2, target1, smolreal, kvearlyint4, onebkve, pipeattn, gridpad, ctxtests, gateupsk, wayin, wayin7b, jitfeatures, peerar, structcost, adopt1b, structab, mini46, mini46b)"
       exit 2 ;;
  esac
done
[ -f "$OUT/run/results.md" ] && sed -n '/^## TTFT/,/^## Two-process/p' "$OUT/run/results.md" | head -60
[ -f "$OUT/e2e_probe.log" ] && tail -8 "$OUT/e2e_probe.log"
# The device tool brings back at most 8 files from $OUT: everything goes back as one archive (unpack it here).
(cd "$OUT" && tar czf /tmp/device_session.tgz . && find . -mindepth 1 -delete && mv /tmp/device_session.tgz .)
exit 0
