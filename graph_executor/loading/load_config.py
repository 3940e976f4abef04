"""What to load and where (`LoadConfig`), validated on construction, without torch: the launcher builds and checks
it from the command line before it imports the loader (graph_executor/loading/loader.py)."""

from __future__ import annotations

from dataclasses import dataclass

from graph_executor.loading.default_model import DEFAULT_MODEL_NAME
from graph_executor.quant.names import DEFAULT_GROUP, GROUPS, QUANTIZE_METHODS
from ipc.messages import MAX_NUM_SEQS

LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
TP_ALLREDUCE = ("nccl", "peer")  # --tp-allreduce
DEFAULT_MAX_CONTEXT = 4096


@dataclass(frozen=True)
class LoadConfig:
    """What to load and where; validated on construction."""

    model: str = DEFAULT_MODEL_NAME
    load_format: str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    max_context: int | None = None  # None: min(model's max positions, DEFAULT_MAX_CONTEXT)
    seed: int = 0  # random weights of `dummy`
    progress: bool = True
    quantize: str | None = None  # int8 | int4 | fp8: round-to-nearest at load (HF checkpoints, dummy models)
    quantize_group: int = DEFAULT_GROUP  # weights per scale of int8 / int4
    dequantize: bool = False  # GGUF: every tensor to the activation dtype at load (else packed types stay packed)
    max_num_seqs: int = 1  # KV slots: sequences held (and decoded together) at once
    # max_num_seqs is a default, not the user's: fewer slots that fit are taken instead of failing (a model that
    # fits with one KV cache still loads when `serve`'s default slot count would not fit)
    fit_slots: bool = False
    tensor_parallel: int = 1  # ranks the model is split over (graph_executor/tensor_parallel.py)
    tp_rank: int = 0  # which rank's part this process loads
    # how GPU ranks sum a decode step's hidden vectors: NCCL's all-reduce, or one kernel reading every rank's vector
    # over peer memory (kernels/peer_allreduce.py; vectors of up to the hidden size, NCCL past that)
    tp_allreduce: str = "nccl"
    # on a GPU, the packed slots quant/tiles.py names (int4's and int8's o_proj and down_proj) stored tile-major for
    # the decode GEMVs (measured on the 7B step, H200: int4 -2.7%, int8 -0.4%); False keeps every slot row-major
    tile_packed: bool = True

    def __post_init__(self) -> None:
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {self.load_format!r}")
        if self.max_context is not None and self.max_context < 2:
            raise ValueError(f"max_context must be at least 2, got {self.max_context}")
        if self.quantize is not None and self.quantize not in QUANTIZE_METHODS:
            raise ValueError(f"--quantize must be one of {', '.join(QUANTIZE_METHODS)}, got {self.quantize!r}")
        if self.quantize_group not in GROUPS:
            raise ValueError(f"--quantize-group must be one of {', '.join(map(str, GROUPS))}, "
                             f"got {self.quantize_group}")
        if self.quantize is not None and self.dequantize:
            raise ValueError("--quantize and --dequantize exclude each other")
        if self.tp_allreduce not in TP_ALLREDUCE:
            raise ValueError(f"--tp-allreduce must be one of {', '.join(TP_ALLREDUCE)}, got {self.tp_allreduce!r}")
        if self.tensor_parallel < 1 or not 0 <= self.tp_rank < self.tensor_parallel:
            raise ValueError(f"tensor-parallel rank {self.tp_rank} of {self.tensor_parallel} does not exist")
        if not 1 <= self.max_num_seqs <= MAX_NUM_SEQS:
            raise ValueError(f"--max-num-seqs must be in 1..{MAX_NUM_SEQS}, got {self.max_num_seqs}")
