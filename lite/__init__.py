"""LongCat-Flash-Lite-style language models in JAX / Flax NNX."""

from lite.config import ConfigError, ModelConfig, YarnScaling, get_config, PRESETS

__all__ = ["ConfigError", "ModelConfig", "YarnScaling", "get_config", "PRESETS"]
