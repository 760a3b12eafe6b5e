"""rankshare: parameter-efficient fine-tuning with shared low-rank structure (LoTR, MoR, MoE-LoRA)."""

from .version import __version__

from .config import AdapterConfig, ExternalAdapterConfig, methods, register
from .errors import RankshareError
from .layer import AdapterLayer
from .model import AdaptedModel, adapt

# The methods register themselves in this order, the order in which rankshare.methods() lists them.
from .peft_lora import PeftLoraConfig
from .lotr import LotrConfig, LotrGroup, LotrLayer
from .mor import MorConfig, MorLayer
from .moelora import MoeLoraConfig, MoeLoraLayer

__all__ = [
    "AdaptedModel",
    "AdapterConfig",
    "AdapterLayer",
    "ExternalAdapterConfig",
    "LotrConfig",
    "LotrGroup",
    "LotrLayer",
    "MoeLoraConfig",
    "MoeLoraLayer",
    "MorConfig",
    "MorLayer",
    "PeftLoraConfig",
    "RankshareError",
    "__version__",
    "adapt",
    "methods",
    "register",
]
