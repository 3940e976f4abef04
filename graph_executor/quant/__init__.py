"""Packed low-bit weight formats (issue 10): the group-quantized layouts that the low-bit GEMV kernels
(`graph_executor/kernels/gemv_splitk.py`) read, their conversion from GGUF blocks, round-to-nearest
quantization of float weights, and dequantization for references and the CPU path (`formats.py`).
"""
