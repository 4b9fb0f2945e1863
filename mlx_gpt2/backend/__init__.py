"""What is fast on the backend MLX runs on: the device and its dtype (`device`), the float weights' memory
layout (`layout`), and quantized layers held in the layout the CPU multiplies fastest (`cpu_quantized`)."""

from .device import (
    DTYPES, PREFILL_STEP, backend_name, default_dtype, parse_dtype, physical_memory, prefers_input_major, prefill_step,
)
from .layout import LAYOUTS, prepare, resolve_layout, use_input_major

__all__ = [
    "DTYPES", "LAYOUTS", "PREFILL_STEP", "backend_name", "parse_dtype", "default_dtype", "physical_memory", "prefers_input_major", "prefill_step",
    "prepare", "resolve_layout", "use_input_major",
]
