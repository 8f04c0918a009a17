"""Step-typed agentic data: a synthetic trajectory generator, loaders for user data (OpenAI,
ShareGPT, Hermes, Glaive, xLAM), training examples with the loss on the step's own tokens, and
held-out and length-matched evaluation splits."""
from .chat import (QWEN2_CHAT_TEMPLATE, format_tool_calls, parse_tool_calls, render_chatml,
                   render_trajectory, to_chat_messages)
from .examples import IGNORE_INDEX, Example, build_examples, collate, render_step, value_label_weight
from .loaders import FORMATS, load_dataset, save_openai_jsonl
from .splits import (heldout_split, length_matched_split, length_type_correlation, match_lengths,
                     split_stats, within_tolerance)
from .synthetic import generate_trajectories
from .tool_catalog import DOMAINS, TOOLS
from .tokenizer import train_tokenizer
from .types import ROUTED_STEP_TYPES, STEP_TYPES, DataFormatError, Step, Trajectory

__all__ = ["DOMAINS", "FORMATS", "IGNORE_INDEX", "QWEN2_CHAT_TEMPLATE", "ROUTED_STEP_TYPES", "STEP_TYPES",
           "TOOLS", "DataFormatError", "Example", "Step", "Trajectory", "build_examples", "collate",
           "format_tool_calls", "generate_trajectories", "heldout_split", "length_matched_split",
           "length_type_correlation", "load_dataset", "match_lengths", "parse_tool_calls", "render_chatml",
           "render_step", "render_trajectory", "save_openai_jsonl", "split_stats", "to_chat_messages",
           "train_tokenizer", "value_label_weight", "within_tolerance"]
