"""Configuration: the frozen Qwen2 backbone's shape and the LayerRoute method's knobs."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

SUPPORTED_MODEL_TYPES = ("qwen2",)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GRANULARITIES = ("token", "sequence")
KV_POLICIES = ("compute", "drop")


@dataclass(frozen=True)
class BackboneConfig:
    """The fields of a Hugging Face Qwen2 `config.json` that the runtime uses."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int | None = None
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    model_type: str = "qwen2"

    def __post_init__(self):
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"BackboneConfig.{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"BackboneConfig: num_attention_heads ({self.num_attention_heads}) must be a multiple "
                f"of num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"BackboneConfig.head_dim must be even for RoPE, got {self.head_dim}")

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) of each projection in one block."""
        d, f = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (self.q_dim, d), "k_proj": (self.kv_dim, d), "v_proj": (self.kv_dim, d),
            "o_proj": (d, self.q_dim), "gate_proj": (f, d), "up_proj": (f, d), "down_proj": (d, f),
        }

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "BackboneConfig":
        """Build from a parsed config.json; `source` names the file in error messages."""
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"{source}: unsupported model_type {model_type!r}; "
                             f"expected one of {SUPPORTED_MODEL_TYPES}")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: hidden_act {d['hidden_act']!r} is not supported (Qwen2 uses 'silu')")
        if d.get("use_sliding_window", False):
            raise ValueError(f"{source}: use_sliding_window=true is not supported")
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads")
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(f"{source}: missing field(s) {missing}")
        rope_parameters = d.get("rope_parameters") or {}  # transformers 5 nests RoPE here
        rope_theta = d.get("rope_theta", rope_parameters.get("rope_theta", 1_000_000.0))
        for key in ("rope_scaling", "rope_parameters"):
            rope = d.get(key) or {}
            if rope.get("rope_type", rope.get("type", "default")) != "default":
                raise ValueError(f"{source}: {key} {rope} is not supported (default RoPE only)")
        try:
            return cls(
                vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
                intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
                num_attention_heads=d["num_attention_heads"],
                num_key_value_heads=d.get("num_key_value_heads", d["num_attention_heads"]),
                head_dim=d.get("head_dim"), rope_theta=float(rope_theta),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
                model_type=model_type)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class LayerRouteConfig:
    """The method's knobs (docs/DESIGN.md section 1).

    rank, alpha, targets: LoRA on the frozen projections (scale alpha / rank).
    granularity: "token" (each token decides) or "sequence" (mean of the step's hidden states
        decides for every token of the step and the decode steps after it).
    tau: a token runs block l iff sigmoid(router_l(h)) >= tau.
    kv_policy: "compute" (a skipping token still writes K/V) or "drop" (it is absent).
    gate_lambda: weight of the gate regularization term, lambda * mean(p).
    target_rate: if set, the gate term is (mean(p) - target_rate)^2 instead (a target-rate variant).
    agree_lambda: weight of the batch-agreement term, lambda x the mean over blocks of the variance
        of p across the gated tokens (each sequence's p under `sequence`): rows of a decode batch
        agree on a block when their p lie near the block's mean, so that the batch policy
        (batch_q) forces few of them. 0 (the default) leaves it out.
    router_init_bias: routers start with weight 0 and this bias, so p starts near 1 (dense).
    """

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    granularity: str = "token"
    tau: float = 0.5
    kv_policy: str = "compute"
    gate_lambda: float = 1.0
    target_rate: float | None = None
    router_init_bias: float = 3.0
    agree_lambda: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LayerRouteConfig.rank must be an integer >= 1, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ValueError(f"LayerRouteConfig.alpha must be a number > 0, got {self.alpha!r}")
        object.__setattr__(self, "alpha", float(self.alpha))
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown:
            raise ValueError(f"LayerRouteConfig.targets: unknown target module(s) {unknown}; "
                             f"expected a subset of {LORA_TARGETS}")
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"LayerRouteConfig.targets has duplicates: {self.targets}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"LayerRouteConfig.granularity must be one of {GRANULARITIES}, "
                             f"got {self.granularity!r}")
        check_tau(self.tau, "LayerRouteConfig.tau")
        if self.kv_policy not in KV_POLICIES:
            raise ValueError(f"LayerRouteConfig.kv_policy must be one of {KV_POLICIES}, "
                             f"got {self.kv_policy!r}")
        if self.gate_lambda < 0:
            raise ValueError(f"LayerRouteConfig.gate_lambda must be >= 0, got {self.gate_lambda!r}")
        if isinstance(self.agree_lambda, bool) or not isinstance(self.agree_lambda, (int, float)) \
                or not self.agree_lambda >= 0:
            raise ValueError(f"LayerRouteConfig.agree_lambda must be a number >= 0, got {self.agree_lambda!r}")
        if self.target_rate is not None and not 0.0 <= self.target_rate <= 1.0:
            raise ValueError(f"LayerRouteConfig.target_rate must be in [0, 1], got {self.target_rate!r}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["targets"] = list(self.targets)
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "LayerRouteConfig") -> "LayerRouteConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{source}: unknown field(s) {unknown}")
        return cls(**d)


def check_tau(tau, what: str = "tau") -> float:
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0.0 <= tau <= 1.0:
        raise ValueError(f"{what} must be a number in [0, 1], got {tau!r}")
    return float(tau)
