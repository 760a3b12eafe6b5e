"""rankshare: parameter-efficient fine-tuning with shared low-rank structure (LoTR, MoR, MoE-LoRA)."""

__version__ = "0.1.0"

from .config import AdapterConfig
from .errors import RankshareError
from .layer import AdapterLayer
from .lotr import LotrConfig, LotrGroup, LotrLayer
from .model import AdaptedModel, adapt
from .moelora import MoeLoraConfig, MoeLoraLayer
from .mor import MorConfig, MorLayer

__all__ = [
    "AdaptedModel",
    "AdapterConfig",
    "AdapterLayer",
    "LotrConfig",
    "LotrGroup",
    "LotrLayer",
    "MoeLoraConfig",
    "MoeLoraLayer",
    "MorConfig",
    "MorLayer",
    "RankshareError",
    "adapt",
]
