"""Weight loading for the graph executor: model references (HF folder, GGUF, dummy presets, the embedded
default), their config, the HF-name weight map and the conversion cache. Everything here runs before the
first step; nothing here is on the per-token path."""
