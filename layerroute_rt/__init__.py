"""layerroute_rt: Qwen2 decoders that skip transformer blocks per token, with learned routers and
LoRA adapters on frozen weights. See docs/DESIGN.md for the semantics."""
from .model.cache import KVCache
from .model.checkpoint import CheckpointError, CheckpointNotFoundError
from .config import BackboneConfig, LayerRouteConfig
from .runtime.engine import InferenceModel
from .model.flops import count_parameters, flops_report
from .runtime.generate import GenerateOutput, GenerationStream, StreamChunk, engine_for, generate
from .runtime.prefix_cache import PrefixCache
from .model.modeling import LayerRouteModel, load
from .model import real_model  # `from layerroute_rt import real_model`, as the README shows
from .runtime.toolcalls import parse_tool_calls

__all__ = ["BackboneConfig", "CheckpointError", "CheckpointNotFoundError", "GenerateOutput",
           "GenerationStream", "InferenceModel", "KVCache", "LayerRouteConfig", "LayerRouteModel", "PrefixCache",
           "StreamChunk", "count_parameters", "engine_for", "flops_report", "generate", "load",
           "parse_tool_calls"]
__version__ = "0.1.0"
