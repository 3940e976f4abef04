"""Packed weights stored tile-major for the decode GEMVs (`Int4Groups.tiled` / `Int8Groups.tiled`).

Why: a split-K decode GEMV program reads BLOCK_N rows x BLOCK_KW words of codes and their groups' scales and
offsets. Row-major, that is BLOCK_N runs of a few hundred bytes a row apart, and the scales and offsets come in
2-byte loads; tile-major with the program's block as the tile, it is one contiguous run of each, in 16-byte
loads. The prefill GEMM, the dequantizing pass and the embedding gather read the same storage through
`gemv_splitk.tile_offsets`. Same values: under the Triton interpreter the same bits; on a GPU a tile-major load may
be laid out differently in registers, and with it the order of a program's sums (float32 rounding apart, as between
two block configs). Only on the GPU: the CPU path keeps row-major weights (it dequantizes packed slots at load).
"""

from __future__ import annotations

from graph_executor.model import LlamaModel, set_weight
from graph_executor.quant.formats import Int4Groups, Int8Groups
from graph_executor.quant.specs import slot_shapes

# What the loader stores tile-major on a GPU (LoadConfig.tile_packed): o_proj and down_proj, int4 and int8. Measured
# (H200, LLaMA-2-7B, the step's graph, 5 alternating rounds, bench/NOTES.md thirtieth and thirty-first sessions):
# int4 with those two tiled 1.754 -> 1.706 ms at context 300 (0.973x), 2.055 -> 2.008 at 2000; every slot tiled
# 1.756 -> 1.757 (qkv and gate_up read 4% slower tiled, o 10% and down 7.5% faster); int8 with those two tiled
# 2.341 -> 2.331 (0.996x), 2.642 -> 2.631 at 2000.
DEFAULT_SLOTS = ("o_proj", "down_proj")
DEFAULT_KINDS = (Int4Groups, Int8Groups)
TILE_ROWS = 32  # the split-K decode plans' BLOCK_N (fused_decoder.INT4_PLAN, most of INT8_PLAN)
TILE_WORDS = 128  # and their BLOCK_KW: 32-bit words of codes along K


def decode_tiles(w: Int4Groups | Int8Groups) -> tuple[int, int] | None:
    """The tiles `w` is stored in for the decode GEMVs: `tiles_for` TILE_ROWS x TILE_WORDS (LLaMA-2-7B's down_proj:
    1,376 int4 words a row, tiles of 32 words)."""
    return tiles_for(w, TILE_ROWS, TILE_WORDS)


def tiles_for(w: Int4Groups | Int8Groups, rows: int, words: int) -> tuple[int, int] | None:
    """Tiles of `rows` x `words` 32-bit code words for `w`, or along K the largest power of two below `words` that
    divides the row's words and holds whole groups; None where w's rows are not whole blocks of `rows` or no width
    fits."""
    n, k = w.shape
    row_words = k // w.per_word
    if n % rows:
        return None
    width = words
    while width >= w.words_per_group:
        if row_words % width == 0 and width % w.words_per_group == 0:
            return rows, width
        width //= 2
    return None


def tile_model(model: LlamaModel, names: tuple[str, ...] | None = None,
               kinds: tuple[type, ...] = (Int4Groups, Int8Groups)) -> list[str]:
    """Store the packed slots of `model` of the formats in `kinds` whose names (`qkv_proj`, `o_proj`, ...,
    `embed_tokens`, `lm_head`) are in `names` (None: every one) tile-major (`decode_tiles`), one slot at a time
    (the peak is one slot's extra copy); a tied lm_head keeps sharing the embedding's weight. Returns the slots
    tiled."""
    done = []
    for slot in slot_shapes(model.config):
        owner, _, name = slot.rpartition(".")
        if names is not None and name not in names:
            continue
        module = model.get_submodule(owner) if owner else model
        w = getattr(module, name)
        if not isinstance(w, kinds) or w.tiles is not None or (tiles := decode_tiles(w)) is None:
            continue
        tiled = w.tiled(tiles)
        set_weight(module, name, tiled)
        if slot == "embed_tokens" and model.config.tie_word_embeddings:
            set_weight(model, "lm_head", tiled)
        done.append(slot)
    return done
