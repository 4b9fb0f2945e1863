"""Quantization: which layers, which bits, fitted scales, recorded in config.json as mlx-lm records it."""

from .quantize import QuantizeConfig, bits_per_weight, is_quantized, quantize_model

__all__ = ["QuantizeConfig", "bits_per_weight", "is_quantized", "quantize_model"]
