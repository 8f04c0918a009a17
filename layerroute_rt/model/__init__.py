"""The model: the plain-torch Qwen2 decoder with its routers and LoRA adapters (modeling: the
oracle the engine is tested against, and what training runs), its KV cache, checkpoint and GGUF
loading, the fetch of the bundled real model, and FLOPs accounting. It imports only ops and
config: everything else builds on it."""
