"""The transformer, its configuration, and loading/saving of trained models."""

from .config import PRESETS, ModelConfig, from_preset
from .transformer import KVCache, Transformer, lm_loss

__all__ = ["PRESETS", "KVCache", "ModelConfig", "Transformer", "from_preset", "lm_loss"]
