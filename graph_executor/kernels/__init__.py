"""Triton kernels of the executor's step: fused GEMVs, RMSNorm/SwiGLU rows, RoPE + KV append, decode attention.
They run inside the captured CUDA graphs (the static part); the parts of a step that change every token (the
position, the KV length) they read from device memory, so one graph serves every position. The greedy token's
kernel (argmax.py) runs after a graph, in the executor or the JIT context's sampler.

Import this package only on the GPU path or in tests: under TRITON_INTERPRET=1 (set before import) the same
kernels run on CPU tensors.
"""
