"""The names and sizes of the packed formats that the command line and `LoadConfig` check, without torch: the
launcher validates flags before it imports anything heavy (quant/specs.py and quant/formats.py use these)."""

QUANTIZE_METHODS = ("int8", "int4", "fp8")  # --quantize
DEFAULT_GROUP = 32  # --quantize-group's default
GROUPS = (16, 32, 64, 128, 256)  # powers of two: the kernels reshape a K tile into groups
