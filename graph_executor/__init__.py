"""The process that owns weights, KV cache and CUDA graphs: model code, weight loading, graph capture."""
