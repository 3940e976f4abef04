"""Packed weights in a whole model: `--quantize` at load, GGUF types kept packed, the fused decode and prefill
steps over packed slots (the Triton kernels run in the interpreter on CPU), and bad input."""

from __future__ import annotations

import dataclasses
import re

import gguf
import numpy as np
import pytest
import torch
import transformers

from graph_executor.fused_decoder import INT4_PLAN, INT8_PLAN, FusedDecoder
from graph_executor.fused_prefill import FusedPrefill
from graph_executor.loading.gguf_loader import gguf_config, gguf_plan, open_gguf
from graph_executor.loading.loader import LoadConfig, _load_gguf, load_model
from graph_executor.model import LlamaModel
from graph_executor.quant.apply import quantize_model
from graph_executor.quant.formats import Fp8Rows, Int4Groups, Int8Groups
from graph_executor.quant.specs import WeightSpec, fit, join, quantize_plan, spec_of
from graph_executor.quant.tiles import tile_model
from ipc.errors import ModelLoadError
from tests.test_loaders import GGUF_NAMES, llama_cpp_permute
from tests.test_model_equivalence import BASE, make_hf_model
from tests.test_quant import gguf_weights

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double().cpu() - b.double().cpu()).abs().max() / b.double().cpu().abs().max())


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    make_hf_model(transformers.LlamaConfig, dict(num_key_value_heads=2), seed=31).save_pretrained(path)
    return path


def logits_of(model: LlamaModel, ids: torch.Tensor) -> torch.Tensor:
    t = ids.shape[0]
    return model(ids.to(model.device), torch.arange(t, device=model.device),
                 torch.tensor([t - 1], device=model.device), t)[0]


PROMPT = torch.randint(0, BASE["vocab_size"], (12,), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("method", ["int4", "int8", "fp8"])
def test_quantize_at_load_cpu_computes_with_the_packed_values(hf_folder, method: str) -> None:
    """The CPU path dequantizes at load: its logits equal the packed model's (which dequantizes per use), and
    stay close to the float model's (a sanity bound on the quantization error, not a quality figure)."""
    base = LoadConfig(model=str(hf_folder), device="cpu", dtype="float32", progress=False)
    dense = load_model(base).model
    quant = load_model(LoadConfig(**{**base.__dict__, "quantize": method}))
    assert quant.weight_format.startswith({"int4": "int4-g32+offset", "int8": "int8-g32", "fp8": "fp8"}[method])
    assert "dequantized to float32 on the cpu" in quant.weight_format
    assert all(isinstance(layer.qkv_proj, torch.Tensor) for layer in quant.model.layers)
    packed = load_model(base).model
    quantize_model(packed, quantize_plan(method, 32, packed.config), progress=False, keep_packed=True)
    kind = {"int4": Int4Groups, "int8": Int8Groups, "fp8": Fp8Rows}[method]
    assert isinstance(packed.layers[0].gate_up_proj, kind)
    # int4 and fp8 keep the embedding and lm_head at int8
    assert isinstance(packed.embed_tokens, Int8Groups) and isinstance(packed.lm_head, Int8Groups)
    a, b, ref = logits_of(quant.model, PROMPT), logits_of(packed, PROMPT), logits_of(dense, PROMPT)
    assert rel(a, b) < 1e-6
    assert rel(a, ref) < {"int4": 0.2, "int8": 0.02, "fp8": 0.1}[method]
    assert rel(a, ref) > 0  # it did quantize


@pytest.mark.parametrize("method", ["int4", "int8", "fp8"])
def test_fused_steps_over_packed_weights_match_the_reference(hf_folder, method: str) -> None:
    """FusedPrefill (low-bit GEMM, packed embedding gather) and FusedDecoder (low-bit / FP8 GEMVs) against the
    reference step on the same packed model, every logit compared."""
    model = load_model(LoadConfig(model=str(hf_folder), device=str(DEVICE), dtype="float32", max_context=32,
                                  progress=False, tile_packed=False)).model  # row-major first, tiled below
    quantize_model(model, quantize_plan(method, 32, model.config), progress=False, keep_packed=True)
    ids = PROMPT.to(DEVICE)

    def fused_run(check: bool) -> list[torch.Tensor]:
        """The prompt's prefill, then two decode steps: each one's logits (checked against the reference)."""
        logits = torch.full((BASE["vocab_size"],), float("nan"), device=DEVICE)
        FusedPrefill(model, 16).run(ids, torch.arange(12, device=DEVICE), torch.tensor([11], device=DEVICE), logits)
        got = [logits.clone()]
        if check:  # the reference writes the cache too: the fused path's is put back after it
            cache = model.kv_cache.clone()
            assert rel(logits, logits_of(model, PROMPT)) < 1e-4
            assert torch.allclose(cache, model.kv_cache, atol=1e-5)
            model.kv_cache.copy_(cache)
        decoder = FusedDecoder(model)
        for position, token in ((12, 7), (13, 200)):
            t, p = torch.tensor([token], device=DEVICE), torch.tensor([position], device=DEVICE)
            decoder.step(t, p, logits)
            got.append(logits.clone())
            if check:
                cache = model.kv_cache.clone()
                assert rel(logits, model(t, p, torch.tensor([0], device=DEVICE), position + 1)[0]) < 1e-4
                model.kv_cache.copy_(cache)
        return got

    row_major = fused_run(check=True)
    # the same weights stored tile-major (quant/tiles.py): the same bits from the GEMM, the GEMVs and the gather
    tiled = tile_model(model)
    assert (method == "fp8") == ("layers.0.qkv_proj" not in tiled) and ("embed_tokens" in tiled)
    for a, b in zip(fused_run(check=False), row_major, strict=True):  # on a GPU the sums' order may differ (tests/
        assert torch.equal(a, b) if DEVICE.type == "cpu" else rel(a, b) < 1e-5  # test_tiles.same)


# -- GGUF files whose tensors stay packed --------------------------------------------------------------------

QTYPES = {  # a mix: a fused QKV of Q4_0 + Q4_1 + Q8_0 parts is joined to int8 with offsets
    "attn_q.weight": gguf.GGMLQuantizationType.Q4_0, "attn_k.weight": gguf.GGMLQuantizationType.Q4_1,
    "attn_v.weight": gguf.GGMLQuantizationType.Q8_0, "attn_output.weight": gguf.GGMLQuantizationType.Q5_0,
    "ffn_gate.weight": gguf.GGMLQuantizationType.Q4_1, "ffn_up.weight": gguf.GGMLQuantizationType.Q4_1,
    "ffn_down.weight": gguf.GGMLQuantizationType.Q5_1, "token_embd.weight": gguf.GGMLQuantizationType.Q8_0,
    "output.weight": gguf.GGMLQuantizationType.Q4_0,
}


def quantized_blocks(a: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """`gguf.quants.quantize` where the package implements it; random blocks with sane float16 scales for the
    K-quants it cannot write (their values then differ from `a`: both loads read the same file)."""
    t = gguf.GGMLQuantizationType
    if qtype in (t.Q4_K, t.Q6_K):
        return gguf_weights(qtype, *a.shape, seed=a.shape[0])
    if qtype == t.Q2_K:  # block of 256: scales[16], qs[64], d, dmin
        rng = np.random.default_rng(0)
        n, nb = a.shape[0], a.shape[1] // 256
        b = rng.integers(0, 256, (n, nb, 84), dtype=np.uint8)
        b[..., 80:84] = rng.uniform(1e-4, 2e-3, (n, nb, 2)).astype(np.float16).view(np.uint8).reshape(n, nb, 4)
        return b.reshape(n, nb * 84)
    return gguf.quants.quantize(a, qtype)


def write_quantized_gguf(hf_model, path, qtypes=QTYPES) -> None:
    """As llama.cpp writes a quantized file: Q/K rows permuted, each matrix quantized by `gguf.quants`."""
    cfg = hf_model.config
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    globals_ = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}
    for name, t in hf_model.state_dict().items():
        a = t.numpy().astype(np.float32)
        out = globals_.get(name)
        if out is None:
            rest = ".".join(name.split(".")[3:])
            out = f"blk.{name.split('.')[2]}.{GGUF_NAMES[rest]}"
            if rest == "self_attn.q_proj.weight":
                a = llama_cpp_permute(a, cfg.num_attention_heads)
            elif rest == "self_attn.k_proj.weight":
                a = llama_cpp_permute(a, cfg.num_key_value_heads)
        qtype = next((q for suffix, q in qtypes.items() if out.endswith(suffix)), None)
        if qtype is None:
            w.add_tensor(out, a)
        else:
            w.add_tensor(out, quantized_blocks(a, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def quantized_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-mixed.gguf"
    write_quantized_gguf(make_hf_model(transformers.LlamaConfig, dict(num_key_value_heads=2), seed=32), path)
    return path


def packed_gguf_model(path, device=DEVICE) -> LlamaModel:
    """The GPU load path (slots allocated packed, blocks converted on the device), forced on any device."""
    reader = open_gguf(path)
    config = gguf_config(reader)
    model = LlamaModel(config, 32, device, torch.float32, plan=gguf_plan(reader, config))
    _load_gguf(model, reader, progress=False)
    return model


def test_gguf_packed_equals_gguf_dequantized(quantized_gguf) -> None:
    """Kept packed (joined and converted exactly) vs dequantized by the gguf package: the same model."""
    dense = load_model(LoadConfig(model=str(quantized_gguf), device="cpu", dtype="float32", progress=False))
    assert dense.weight_format.startswith("int")  # the plan; stored dense on the cpu
    packed = packed_gguf_model(quantized_gguf, torch.device("cpu"))
    layer = packed.layers[0]
    assert spec_of(layer.qkv_proj) == WeightSpec("int8", 32, offset=True)  # Q4_0 + Q4_1 + Q8_0
    assert spec_of(layer.gate_up_proj) == WeightSpec("int4", 32, offset=True)  # Q4_1
    assert spec_of(layer.o_proj) == WeightSpec("int8", 32, offset=False)  # Q5_0
    assert spec_of(packed.lm_head) == WeightSpec("int4", 32, offset=False)  # Q4_0
    for name, w in (("qkv", layer.qkv_proj), ("down", layer.down_proj), ("lm_head", packed.lm_head)):
        ref = getattr(dense.model.layers[0], f"{name}_proj") if name != "lm_head" else dense.model.lm_head
        assert torch.equal(w.dequantize(torch.float32), ref), name
    assert rel(logits_of(packed, PROMPT), logits_of(dense.model, PROMPT)) < 1e-6


def test_fused_decoder_over_a_packed_gguf(quantized_gguf) -> None:
    model = packed_gguf_model(quantized_gguf)
    logits_of(model, PROMPT)  # fills the cache for positions 0..11
    logits = torch.full((BASE["vocab_size"],), float("nan"), device=DEVICE)
    t, p = torch.tensor([3], device=DEVICE), torch.tensor([12], device=DEVICE)
    FusedDecoder(model).step(t, p, logits)
    assert rel(logits, model(t, p, torch.tensor([0], device=DEVICE), 13)[0]) < 1e-4


def test_a_decoder_with_reduce_kernels_gives_the_same_logits(quantized_gguf) -> None:
    """FusedDecoder with every packed projection's partials added by a second kernel (SplitKConfig.reduce_kernel:
    int4 and int8, offsets or not, sharing the decoder's one scratch) gives the default decoder's logits, bit for
    bit."""
    model = packed_gguf_model(quantized_gguf)
    logits_of(model, PROMPT)  # fills the cache for positions 0..11
    t, p = torch.tensor([3], device=DEVICE), torch.tensor([12], device=DEVICE)
    got = []
    for reduce_kernel in (False, True):
        plans = {name: dataclasses.replace(plan, **{f.name: dataclasses.replace(getattr(plan, f.name),
                                                                                reduce_kernel=reduce_kernel)
                                                    for f in dataclasses.fields(plan)})
                 for name, plan in (("int4", INT4_PLAN), ("int8", INT8_PLAN))}
        logits = torch.full((BASE["vocab_size"],), float("nan"), device=DEVICE)
        FusedDecoder(model, **plans).step(t, p, logits)
        got.append(logits)
    assert torch.equal(got[0], got[1])


def test_gguf_types_without_a_packed_format_are_dequantized_and_named(tmp_path) -> None:
    path = tmp_path / "q2k.gguf"
    torch.manual_seed(33)  # K-quants come in blocks of 256: a wider model
    config = transformers.LlamaConfig(**{**BASE, "hidden_size": 256, "intermediate_size": 256,
                                         "num_key_value_heads": 2})
    hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    write_quantized_gguf(hf, path, {"attn_q.weight": gguf.GGMLQuantizationType.Q2_K,
                                    "attn_k.weight": gguf.GGMLQuantizationType.Q4_0,
                                    "ffn_gate.weight": gguf.GGMLQuantizationType.Q6_K,
                                    "ffn_up.weight": gguf.GGMLQuantizationType.Q4_K})
    reader = open_gguf(path)
    plan = gguf_plan(reader, gguf_config(reader))
    assert not plan.spec("layers.0.qkv_proj").packed  # a Q2_K part: the whole fused slot is dense
    assert plan.dequantized == ("blk.0.attn_q.weight (Q2_K)", "blk.0.attn_k.weight (Q4_0)",
                                "blk.1.attn_q.weight (Q2_K)", "blk.1.attn_k.weight (Q4_0)")
    assert plan.spec("layers.1.gate_up_proj") == WeightSpec("int8", 16, offset=True)  # Q6_K + Q4_K
    model = packed_gguf_model(path, torch.device("cpu"))
    dense = load_model(LoadConfig(model=str(path), device="cpu", dtype="float32", progress=False)).model
    # K-quant scales rounded once to float16 (formats.py): <= 2**-11 relative per group, not bit-exact
    assert rel(logits_of(model, PROMPT), logits_of(dense, PROMPT)) < 2e-3


def test_fit_converts_exactly_between_packed_specs() -> None:
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(2))
    from graph_executor.quant.formats import quantize_int4, quantize_int8

    sym4 = Int4Groups(quantize_int4(w).codes, quantize_int4(w).scale, None, 32)
    for src in (quantize_int4(w), sym4, quantize_int8(w)):
        for spec in (WeightSpec("int8", 16, True), WeightSpec("int8", 32, True),
                     WeightSpec("int8", 16, True, torch.float32)):
            assert torch.equal(fit(src, spec).dequantize(), src.dequantize())
    assert torch.equal(fit(sym4, WeightSpec("int4", 16, True)).dequantize(), sym4.dequantize())
    assert torch.equal(fit(sym4, WeightSpec("int8", 32, False)).dequantize(), sym4.dequantize())
    with pytest.raises(ValueError, match="cannot convert"):
        fit(quantize_int8(w), WeightSpec("int4", 32, True))
    with pytest.raises(ValueError, match="cannot drop the offsets"):
        fit(quantize_int4(w), WeightSpec("int8", 32, False))
    assert join([WeightSpec("int4", 32, False), WeightSpec("int8", 16, False)]) == WeightSpec("int8", 16, False)
    assert not join([WeightSpec("int4"), WeightSpec("dense")]).packed


def test_bad_quantize_input_is_one_line(hf_folder, quantized_gguf) -> None:
    with pytest.raises(ValueError, match="--quantize must be one of int8, int4, fp8"):
        LoadConfig(quantize="int3")
    with pytest.raises(ValueError, match="--quantize-group must be one of"):
        LoadConfig(quantize="int4", quantize_group=48)
    with pytest.raises(ModelLoadError, match="--quantize-group 64 does not divide the intermediate size \\(96\\)"):
        load_model(LoadConfig(model=str(hf_folder), device="cpu", quantize="int4", quantize_group=64,
                              progress=False))
    with pytest.raises(ModelLoadError, match="a GGUF file is already quantized"):
        load_model(LoadConfig(model=str(quantized_gguf), device="cpu", quantize="int8", progress=False))


# -- GPU: graphs over packed weights, and the shipped Q4_1 GGUF kept packed ------------------------------------

@pytest.fixture
def smollm2_gguf() -> str:
    from tests.conftest import smollm2_gguf_path

    return smollm2_gguf_path()


def run_steps(runner, prompt: list[int], forced: list[int] | None, steps: int) -> tuple[list, list[int]]:
    """Prefill + decode through a runner's buffers: teacher-forced tokens, or greedy when `forced` is None."""
    b = runner.buffers
    b.input_ids[: len(prompt)].copy_(torch.tensor(prompt))
    runner.prefill(len(prompt))
    logits, tokens = [b.logits.clone()], []
    for i in range(steps):
        token = forced[i] if forced is not None else int(torch.argmax(b.logits))
        b.next_token.fill_(token)
        tokens.append(token)
        runner.decode(len(prompt) + i)
        logits.append(b.logits.clone())
    return logits, tokens


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["int4", "int8", "fp8"])
def test_graphs_over_quantized_weights_match_eager_reference(method: str) -> None:
    from graph_executor.graphs import GraphRunner
    from graph_executor.runner import ModelRunner

    loaded = load_model(LoadConfig(model="dummy:smollm2-135m", device="cuda", dtype="float16", max_context=256,
                                   quantize=method, progress=False))
    layer = loaded.model.layers[0]
    assert isinstance(layer.o_proj, {"int4": Int4Groups, "int8": Int8Groups, "fp8": Fp8Rows}[method])
    # the loader stores o_proj and down_proj tile-major (LoadConfig.tile_packed; fp8's down_proj is int8), the rest
    # row-major: the graphs and the eager reference below read both layouts
    assert layer.down_proj.tiles is not None and getattr(layer.qkv_proj, "tiles", None) is None
    assert (getattr(layer.o_proj, "tiles", None) is not None) == (method != "fp8")
    prompt = torch.randint(100, 40000, (37,), generator=torch.Generator().manual_seed(0)).tolist()
    eager, tokens = run_steps(ModelRunner(loaded.model), prompt, None, 32)
    graphs = GraphRunner(loaded.model)
    graphs.capture_all()
    replay, _ = run_steps(graphs, prompt, tokens, 32)
    worst = max(rel(g, e) for g, e in zip(replay, eager))
    assert worst < 2e-2, worst  # float16 activations, different accumulation orders


CHATS = ("What is the capital of France?", "Write a haiku about the sea.", "Explain what a CUDA graph is.",
         "List three prime numbers.", "How do I boil an egg?")


@pytest.fixture
def smollm2_tokenizer(request) -> str:
    import os

    return os.environ.get("HYBRIDRT_TEST_TOKENIZER") or str(request.getfixturevalue("default_model_dir"))


@pytest.mark.cuda
def test_smollm2_q4_1_kept_packed_matches_the_file_dequantized(smollm2_gguf, smollm2_tokenizer) -> None:
    """The issue's check: logits within 2e-3 at each of 64 teacher-forced steps (packed weights, float32
    activations: the kernels' own error), and greedy tokens of the float16 packed model against the float32
    dequantized one for 32 tokens on 5 chat prompts (at least 4 identical)."""
    from graph_executor.graphs import GraphRunner
    from graph_executor.runner import ModelRunner

    def load(**kw):
        return load_model(LoadConfig(model=smollm2_gguf, device="cuda", max_context=512, progress=False, **kw))

    ref = load(dtype="float32", dequantize=True)
    packed32 = load(dtype="float32")
    assert "int4-g32+offset" in packed32.weight_format and isinstance(packed32.model.layers[0].qkv_proj, Int4Groups)
    prompt = torch.randint(100, 40000, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    forced = torch.randint(100, 40000, (64,), generator=torch.Generator().manual_seed(2)).tolist()
    ref_logits, _ = run_steps(ModelRunner(ref.model), prompt, forced, 64)
    graphs = GraphRunner(packed32.model)
    graphs.capture_all()
    got, _ = run_steps(graphs, prompt, forced, 64)
    errors = [rel(g, r) for g, r in zip(got, ref_logits)]
    assert max(errors) <= 2e-3, errors
    packed16 = GraphRunner(load(dtype="float16").model)
    packed16.capture_all()
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_tokenizer)
    same = 0
    for chat in CHATS:
        p = tok.apply_chat_template([{"role": "user", "content": chat}], add_generation_prompt=True, tokenize=True)
        p = list(p["input_ids"] if isinstance(p, dict) or hasattr(p, "keys") else p)
        _, want = run_steps(ModelRunner(ref.model), p, None, 32)
        _, have = run_steps(packed16, p, None, 32)
        same += have == want
    assert same >= 4, same


@pytest.mark.parametrize("args,message", [
    (["--quantize", "int3"], "--quantize must be one of int8, int4, fp8, got 'int3'"),
    (["--quantize", "int4", "--quantize-group", "48"], "--quantize-group must be one of 16, 32, 64, 128, 256"),
    (["--quantize", "int4", "--quantize-group", "256", "--model", "dummy:smollm2-135m"],
     "--quantize-group 256 does not divide the hidden size (576)"),
    (["--quantize", "int8", "--model", "GGUF"], "a GGUF file is already quantized"),
])
def test_bad_quantize_flags_are_one_line_and_exit_1(args, message, quantized_gguf, capsys) -> None:
    """Through the CLI's entry point, one line and exit 1, each refused before any process starts: a bad value or
    group by the flags' own checks, a group that does not divide the model's sizes from its preset or config.json,
    and `--quantize` on a GGUF file from its name (the launcher's `check_reference`; the executor refuses them as
    well at load, for a caller that loads in-process)."""
    from launch.cli import main

    args = [str(quantized_gguf) if a == "GGUF" else a for a in args]
    assert main(["generate", "--quiet", "--device", "cpu", *args, "hello"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


@pytest.mark.parametrize("load,ranks,message", [
    (dict(model="dummy:smollm2-135m", quantize="int4", quantize_group=256), 1,
     "--quantize-group 256 does not divide the hidden size (576) of this model"),
    (dict(model="dummy:llama-2-7b", quantize="int8", quantize_group=256), 2,  # 11008 divides by 256, 5504 does not
     "--quantize-group 256 does not divide the intermediate size (5504) of this model (each of the 2 tensor-parallel "
     "ranks' part)"),
    (dict(model="dummy:smollm2-135m"), 2, "--tensor-parallel 2 needs the model's sizes to divide by 2: attention "
     "heads (9), KV heads (3: neither a multiple nor a divisor of 2) do not"),
    (dict(model="GGUF", quantize="int4"), 1, "--quantize applies to HF checkpoints and dummy models; a GGUF file is "
     "already quantized"),
])
def test_the_launcher_refuses_what_the_models_shapes_do_not_allow_before_it_starts_anything(load, ranks, message,
                                                                                            quantized_gguf) -> None:
    """The supervisor's start checks `--quantize` and `--tensor-parallel` against the model's preset or config.json
    (and `--quantize` against a GGUF file's name) and refuses in one line with no child process started: these used
    to start both processes (~3 s on the CPU machine) for the executor to refuse them at load."""
    from launch.supervisor import ServerConfig, Supervisor

    load = {**load, "model": str(quantized_gguf)} if load["model"] == "GGUF" else load
    sup = Supervisor(ServerConfig(LoadConfig(device="cpu", progress=False, **load), tensor_parallel=ranks))
    with pytest.raises(ModelLoadError, match=re.escape(message)):
        sup.start()
    assert sup.children == {}


def test_models_endpoint_reports_the_weight_format() -> None:
    """`/v1/models` carries what the executor's status says it loaded (the app is given it at start)."""
    from fastapi.testclient import TestClient

    from launch.http_api import create_app
    from tests.serve_process import free_port

    app = create_app(f"tcp://127.0.0.1:{free_port()}", "m", None, 128, weight_format="int4-g32+offset")
    with TestClient(app) as client:
        model = client.get("/v1/models").json()["data"][0]
    assert model["id"] == "m" and model["weight_format"] == "int4-g32+offset"


def test_fp8_keeps_down_proj_and_the_vocabulary_in_int8():
    """--quantize fp8: e4m3 rows for qkv, o and gate_up; down_proj (its most sensitive projection) and the vocabulary
    in int8 g32; a down_proj whose K does not divide by 32 stays fp8."""
    import dataclasses

    from graph_executor.loading.presets import preset

    cfg = preset("llama-2-7b")
    plan = quantize_plan("fp8", 32, cfg)
    assert plan.spec("layers.3.down_proj") == WeightSpec("int8", 32, offset=False)
    assert plan.spec("embed_tokens") == plan.spec("lm_head") == WeightSpec("int8", 32, offset=False)
    assert {plan.spec(f"layers.3.{p}").kind for p in ("qkv_proj", "o_proj", "gate_up_proj")} == {"fp8"}
    odd = quantize_plan("fp8", 32, dataclasses.replace(cfg, intermediate_size=11000))
    assert odd.spec("layers.0.down_proj").kind == "fp8"
