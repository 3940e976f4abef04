"""CPU weights as views of their safetensors file (graph_executor/loading/mapped_weights.py): the file
`save_fused_order` writes reads back as any safetensors file, a CPU load of it maps every slot without a copy and
computes what the copying load of the same tensors computes; slots a file does not hold in place are copied."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from graph_executor.loading.loader import LoadConfig, load_model
from graph_executor.loading.mapped_weights import save_fused_order
from graph_executor.model import zeros
from tests.test_model_equivalence import make_hf_model

CONFIGS = {"llama": (transformers.LlamaConfig, dict(num_key_value_heads=2)),
           "qwen2": (transformers.Qwen2Config, dict(num_key_value_heads=2)),  # QKV bias
           "tied": (transformers.LlamaConfig, dict(num_key_value_heads=2, tie_word_embeddings=True))}


def _folders(tmp_path, kind: str) -> tuple:
    """(the HF folder as transformers saves it, the same tensors in the fused order)."""
    config_cls, extra = CONFIGS[kind]
    plain = tmp_path / "plain"
    make_hf_model(config_cls, extra, seed=11).save_pretrained(plain)
    fused = tmp_path / "fused"
    fused.mkdir()
    (fused / "config.json").write_text((plain / "config.json").read_text())
    save_fused_order(load_file(plain / "model.safetensors"), fused / "model.safetensors", {"format": "pt"})
    return plain, fused


def _load(folder):
    return load_model(LoadConfig(model=str(folder), device="cpu", dtype="float32", max_context=32,
                                 progress=False)).model


def _logits(model) -> torch.Tensor:
    ids = torch.tensor([3, 14, 15, 92, 65, 35])
    return model(ids, torch.arange(len(ids)), torch.tensor([len(ids) - 1]), len(ids))


def _slots(model) -> dict[str, torch.Tensor]:
    return {name: b for name, b in model.named_buffers() if name not in ("rope", "kv_caches")}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_fused_order_reads_back_as_any_safetensors_file(tmp_path, dtype) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {"model.layers.1.self_attn.v_proj.weight": torch.randn(4, 6, generator=g),
               "model.layers.0.mlp.up_proj.weight": torch.randn(5, 6, generator=g),
               "model.layers.0.self_attn.q_proj.weight": torch.randn(6, 6, generator=g),
               "model.layers.10.input_layernorm.weight": torch.randn(6, generator=g),
               "model.embed_tokens.weight": torch.randn(9, 6, generator=g), "lm_head.weight": torch.randn(9, 6)}
    tensors = {k: v.to(dtype) for k, v in tensors.items()}
    save_fused_order(tensors, tmp_path / "m.safetensors", {"format": "pt"})
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"} and set(f.keys()) == set(tensors)
        for name, t in tensors.items():
            assert f.get_tensor(name).dtype == dtype and torch.equal(f.get_tensor(name), t), name
    with open(tmp_path / "m.safetensors", "rb") as f:  # the data section starts 8-byte aligned
        assert int.from_bytes(f.read(8), "little") % 8 == 0


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_a_cpu_load_maps_every_slot_of_a_fused_order_file(tmp_path, kind) -> None:
    plain, fused = _folders(tmp_path, kind)
    copied, mapped = _load(plain), _load(fused)
    storages = {b.untyped_storage().data_ptr() for b in _slots(mapped).values()}
    assert len(storages) == 1, "every weight is a view of the one mapping"
    mapping = mapped.embed_tokens.untyped_storage()
    assert mapping.nbytes() == (fused / "model.safetensors").stat().st_size
    for name, b in _slots(copied).items():  # every element as the copying load put it
        assert torch.equal(_slots(mapped)[name], b), name
    if kind == "tied":
        assert mapped.lm_head.data_ptr() == mapped.embed_tokens.data_ptr()
    # the same weights, every element (above); the logits within float32 rounding, not bit for bit: the CPU GEMMs'
    # reduction order follows the operands' address alignment, and a mapped weight sits where the file's header
    # length puts it (transformers 5.25's header left the llama case's mapped weights 8-byte aligned, the copied
    # ones 32: logits 6e-8 apart)
    torch.testing.assert_close(_logits(mapped), _logits(copied), rtol=1e-6, atol=1e-6)


def test_a_file_in_name_order_maps_its_single_tensor_slots_and_copies_the_fused_ones(tmp_path) -> None:
    plain, _ = _folders(tmp_path, "qwen2")
    save_file(load_file(plain / "model.safetensors"), plain / "model.safetensors", {"format": "pt"})  # name order
    model = _load(plain)
    mapping = model.embed_tokens.untyped_storage().data_ptr()
    layer = model.layers[0]
    assert layer.o_proj.untyped_storage().data_ptr() == mapping  # one tensor: a view
    assert layer.down_proj.untyped_storage().data_ptr() == mapping
    assert layer.gate_up_proj.untyped_storage().data_ptr() == mapping  # name order keeps gate, up together
    for fused in (layer.qkv_proj, layer.qkv_bias):  # q, k, v stored k, o, q, v: copied
        assert fused.untyped_storage().data_ptr() != mapping
    ref = load_file(plain / "model.safetensors")
    assert torch.equal(layer.qkv_proj, torch.cat([ref[f"model.layers.0.self_attn.{x}_proj.weight"] for x in "qkv"]))


def test_another_dtype_is_copied_and_converted(tmp_path) -> None:
    plain, fused = _folders(tmp_path, "llama")
    half = load_model(LoadConfig(model=str(fused), device="cpu", dtype="bfloat16", max_context=32,
                                 progress=False)).model
    assert half.embed_tokens.dtype == torch.bfloat16
    assert torch.equal(half.layers[1].gate_up_proj, _load(plain).layers[1].gate_up_proj.to(torch.bfloat16))


def test_writes_to_a_mapped_weight_never_reach_the_file(tmp_path) -> None:
    _, fused = _folders(tmp_path, "llama")
    before = (fused / "model.safetensors").read_bytes()
    model = _load(fused)
    model.layers[0].qkv_proj.fill_(7.0)  # copy-on-write: this process's pages only
    assert (fused / "model.safetensors").read_bytes() == before
    assert _load(fused).layers[0].qkv_proj.abs().max() != 7.0


def test_a_fused_file_with_a_wrong_shape_is_still_the_loaders_clear_error(tmp_path) -> None:
    _, fused = _folders(tmp_path, "llama")
    config = json.loads((fused / "config.json").read_text())
    config["intermediate_size"] = 128  # the file holds 96 rows of gate and of up
    (fused / "config.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match=r"shape mismatch for model\.layers\.0\.mlp\.\w+_proj\.weight"):
        _load(fused)


def test_a_truncated_fused_file_is_an_error_not_a_crash(tmp_path) -> None:
    _, fused = _folders(tmp_path, "llama")
    path = fused / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(Exception, match="truncated or damaged|cannot read"):
        _load(fused)


def test_cpu_zeros_are_zero_and_writable() -> None:
    kv = zeros((2, 3, 4, 5), torch.device("cpu"), torch.float16)
    assert kv.shape == (2, 3, 4, 5) and kv.dtype == torch.float16 and not kv.any()
    kv[1, 2] = 1.5
    assert float(kv.sum()) == 1.5 * 20 and zeros((0, 4), torch.device("cpu"), torch.float32).shape == (0, 4)


def test_save_file_order_is_not_the_fused_order(tmp_path) -> None:
    """Why a file from elsewhere may be copied: safetensors' save_file orders tensors by name (k before q), so q, k,
    v are not consecutive in the slot's order (transformers' save_pretrained writes them in the modules' order)."""
    tensors = {f"model.layers.0.self_attn.{x}_proj.weight": torch.ones(2, 2) for x in "qkv"}
    save_file(tensors, tmp_path / "m.safetensors")
    with open(tmp_path / "m.safetensors", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    begins = [header[f"model.layers.0.self_attn.{x}_proj.weight"]["data_offsets"][0] for x in "qkv"]
    assert begins != sorted(begins)
