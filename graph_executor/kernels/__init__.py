"""Triton kernels for the dynamic part of a step (graph-safe: they read positions from device memory).

Import this package only on the GPU path or in tests: under TRITON_INTERPRET=1 (set before import) the same
kernels run on CPU tensors.
"""
