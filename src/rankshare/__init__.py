"""rankshare: parameter-efficient fine-tuning with shared low-rank structure (LoTR, MoR, MoE-LoRA)."""

from .config import AdapterConfig, ExternalAdapterConfig, Recipe, methods, register
from .errors import RankshareError
from .export import export_peft
from .layer import AdapterLayer
from .model import AdaptedModel, adapt
from .slots import AdaptedLinear, SavedModule
from .version import __version__

# isort: off
# The methods register themselves as they are imported: this order is the order rankshare.methods() lists.
from .peft_lora import PeftLoraConfig
from .lotr import LotrConfig, LotrGroup, LotrLayer
from .mor import MorConfig, MorLayer
from .moelora import MoeLoraConfig, MoeLoraLayer
# isort: on
# below the methods: compress imports lotr, which would register first
from .compress import CompressionReport, GroupFit, compress_lora, compress_loras

__all__ = [
    "AdaptedLinear",
    "AdaptedModel",
    "AdapterConfig",
    "AdapterLayer",
    "CompressionReport",
    "ExternalAdapterConfig",
    "GroupFit",
    "LotrConfig",
    "LotrGroup",
    "LotrLayer",
    "MoeLoraConfig",
    "MoeLoraLayer",
    "MorConfig",
    "MorLayer",
    "PeftLoraConfig",
    "RankshareError",
    "Recipe",
    "SavedModule",
    "__version__",
    "adapt",
    "compress_lora",
    "compress_loras",
    "export_peft",
    "methods",
    "register",
]
