"""CacheGen-style KV codec: layer-wise uniform quantization + static-model rANS over many streams."""
