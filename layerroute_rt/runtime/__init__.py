"""The inference path: the engine (fused block stages, CUDA-graph decode with each block body
under an IF node), generate() and its continuous-batching scheduler, the prefix cache, sampling,
constrained decoding and tool-call parsing. It imports from ops, model and config only, never
from train, eval or serve (tests/test_layout.py checks it)."""
