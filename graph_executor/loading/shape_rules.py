"""Which flags a model's shapes allow, without torch: the tensor-parallel split (`--tensor-parallel`) and the
quantization group (`--quantize-group`). One description of each rule, used by the loader (tensor_parallel.py,
quant/specs.py) and by the launcher, which checks them from the model's config before it starts any process
(`model_source.check_reference`)."""

from __future__ import annotations

import dataclasses

from graph_executor.loading.config import ModelConfig

# --quantize on a GGUF file: one message for the launcher's check and the loader's
QUANTIZE_GGUF = ("--quantize applies to HF checkpoints and dummy models; a GGUF file is already quantized (its packed "
                 "types are kept packed; --dequantize runs it in --dtype)")


def check_split(config: ModelConfig, ranks: int) -> None:
    """ValueError (one line) unless the model splits evenly over `ranks` tensor-parallel ranks: whole attention
    heads, a block of the intermediate size and of the vocabulary each; KV heads split, or replicated when fewer."""
    n = ranks
    bad = [f"{name} ({value})" for name, value in (("attention heads", config.num_heads),
                                                   ("intermediate size", config.intermediate_size),
                                                   ("vocabulary", config.vocab_size)) if value % n]
    if config.num_kv_heads % n and n % config.num_kv_heads:
        bad.append(f"KV heads ({config.num_kv_heads}: neither a multiple nor a divisor of {n})")
    if bad:
        raise ValueError(f"--tensor-parallel {n} needs the model's sizes to divide by {n}: {', '.join(bad)} do not")


def part_config(config: ModelConfig, ranks: int) -> ModelConfig:
    """The shapes of one rank's part (every rank's are the same): its query heads, its KV heads (a share, or the one
    replicated head its queries read) and its block of the MLP. The vocabulary stays whole: it sizes the embedding,
    which every rank holds whole. ValueError where `check_split` refuses the split."""
    check_split(config, ranks)
    kv = config.num_kv_heads
    return dataclasses.replace(config, num_heads=config.num_heads // ranks,
                               num_kv_heads=kv // ranks if kv % ranks == 0 else 1,
                               intermediate_size=config.intermediate_size // ranks)


def check_group(method: str, group: int, config: ModelConfig) -> None:
    """ValueError unless `--quantize method` in groups of `group` weights fits the projections' K (the hidden size,
    and the intermediate size for down_proj; o_proj's K, the query size, is checked as well). FP8 keeps one scale
    per row, so only int8 and int4 have groups; the embedding and lm_head are int8 g32 whatever the group."""
    if method == "fp8":
        return
    for what, k in (("the hidden size", config.hidden_size), ("the query size", config.q_size),
                    ("the intermediate size", config.intermediate_size)):
        if k % group:
            raise ValueError(f"--quantize-group {group} does not divide {what} ({k}) of this model")


def check_part_group(method: str, group: int, part: ModelConfig, ranks: int) -> None:
    """`check_group` for each tensor-parallel rank's part (`part_config`): each rank quantizes its own part, so its
    groups along K must divide the part's K (o_proj's and down_proj's are split); the error says so."""
    try:
        check_group(method, group, part)
    except ValueError as e:
        raise ValueError(f"{e} (each of the {ranks} tensor-parallel ranks' part)") from None
