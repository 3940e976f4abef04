"""Write a Hugging Face-style model folder (config.json, sharded model-*.safetensors + index, tokenizer files) with
random fp16 weights in a preset's shapes, for start-up measurements on a machine without the real checkpoint
(issue 13: "serve ready <= 10 s plus the disk read for a 7B HF folder").

    python -m bench.probes.make_hf_folder --preset llama-2-7b --tokenizer TOKENIZER_DIR --out /tmp/llama7b

The vocabulary takes the tokenizer's size so that the folder serves text; every other shape is the preset's.
The weights are drawn on the GPU when there is one (a 7B folder is 13 GB), and written shard by shard.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from graph_executor.loading.presets import preset

SHARD_BYTES = 4 << 30
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def hf_config(name: str, vocab: int) -> dict:
    c = preset(name)
    return {"architectures": ["LlamaForCausalLM"], "model_type": c.model_type, "vocab_size": vocab,
            "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
            "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
            "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim,
            "max_position_embeddings": c.max_position_embeddings, "rms_norm_eps": c.rms_norm_eps,
            "rope_theta": c.rope_theta, "tie_word_embeddings": c.tie_word_embeddings, "torch_dtype": "float16",
            "bos_token_id": 1, "eos_token_id": 2}


def tensor_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, i, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    shapes = [("model.embed_tokens.weight", (cfg["vocab_size"], h))]
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
                   (p + "self_attn.q_proj.weight", (q, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                   (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, q)),
                   (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                   (p + "mlp.down_proj.weight", (h, i))]
    shapes.append(("model.norm.weight", (h,)))
    if not cfg["tie_word_embeddings"]:
        shapes.append(("lm_head.weight", (cfg["vocab_size"], h)))
    return shapes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--preset", default="llama-2-7b")
    ap.add_argument("--tokenizer", required=True, type=Path, help="a folder with tokenizer.json (copied in)")
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)
    vocab = json.loads((args.tokenizer / "tokenizer.json").read_text())["model"]["vocab"]
    cfg = hf_config(args.preset, max(len(vocab), 1))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "config.json").write_text(json.dumps(cfg, indent=1))
    for f in TOKENIZER_FILES:
        if (args.tokenizer / f).exists():
            shutil.copy(args.tokenizer / f, args.out / f)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device).manual_seed(0)
    start = time.perf_counter()
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = total = 0
    for name, shape in tensor_shapes(cfg):
        if len(shape) == 1:
            t = torch.ones(shape, dtype=torch.float16)
        else:
            t = (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * 0.02).half().cpu()
        nbytes = t.numel() * 2
        if size and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
        total += nbytes
    weight_map = {}
    for n, shard in enumerate(shards):
        fname = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(args.out / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
        print(f"wrote {fname} ({sum(t.numel() * 2 for t in shard.values()) / 2**30:.2f} GiB)", flush=True)
    (args.out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    print(f"{args.out}: {args.preset} shapes, vocab {cfg['vocab_size']}, {total / 2**30:.2f} GiB in "
          f"{len(shards)} shards, {time.perf_counter() - start:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
