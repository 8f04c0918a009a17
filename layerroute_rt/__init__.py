"""layerroute_rt: Qwen2 decoders that skip transformer blocks per token, with learned routers and
LoRA adapters on frozen weights. See DESIGN.md for the semantics."""
from .checkpoint import CheckpointError, CheckpointNotFoundError
from .config import BackboneConfig, LayerRouteConfig
from .flops import count_parameters, flops_report
from .model import KVCache, LayerRouteModel, load

__all__ = ["BackboneConfig", "CheckpointError", "CheckpointNotFoundError", "KVCache",
           "LayerRouteConfig", "LayerRouteModel", "count_parameters", "flops_report", "load"]
__version__ = "0.1.0"
