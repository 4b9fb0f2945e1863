"""Where MLX runs, and what is fast there: the backend, the compute dtype, the prefill chunk, the memory.

Measured on MLX's CPU backend (benchmarks/RESULTS.md): float16 matrix products run 3-5x slower than float32
and bfloat16 ones no faster, so 16-bit checkpoints compute in float32 there; Metal and CUDA keep the
checkpoint's dtype. The weight layout that is fast on each backend is `layout.py`'s.
"""

from __future__ import annotations

import os

import mlx.core as mx

from ..errors import UserError

# Prompt tokens per prefill chunk. On the CPU, 128-token chunks measured as fast as 512 (the reference BLAS
# costs the same per row; chunks stay in cache) with a 10-15 MB lower peak on gpt2 (benchmarks/RESULTS.md).
# Elsewhere 512, unmeasured (GPUs want large chunks; mlx-lm uses 2048).
PREFILL_STEP = {"cpu": 128}


def backend_name() -> str:
    """"metal", "cuda" or "cpu": where MLX's default device runs."""
    if mx.default_device() == mx.cpu:
        return "cpu"
    if mx.metal.is_available():
        return "metal"
    cuda = getattr(mx, "cuda", None)
    return "cuda" if cuda is not None and cuda.is_available() else "gpu"


def physical_memory() -> int:
    """Bytes of memory this machine has (the bound no single allocation may pass)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows): MLX's own view of the device
        return int(mx.device_info().get("memory_size", 2**40)) if hasattr(mx, "device_info") else 2**40


def default_dtype(checkpoint_dtype: mx.Dtype) -> mx.Dtype:
    """The compute dtype for weights stored as `checkpoint_dtype` on the current backend.

    CPU: float32 for every float checkpoint (16-bit matmuls are no faster there, float16 3-5x slower).
    Metal and CUDA: the checkpoint's own dtype (half the memory traffic, and fast kernels).
    """
    if backend_name() == "cpu" and checkpoint_dtype in (mx.float16, mx.bfloat16):
        return mx.float32
    return checkpoint_dtype


def prefill_step(step_size: int | None = None) -> int:
    """`step_size`, or the backend's default prefill chunk (PREFILL_STEP) when it is None."""
    return step_size or PREFILL_STEP.get(backend_name(), 512)


def prefers_input_major() -> bool:
    """True where `x @ W` with W stored (in, out) beats the checkpoint layout: MLX's CPU backend."""
    return backend_name() == "cpu"


DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def parse_dtype(name: str | None) -> mx.Dtype | None:
    """"float32", "float16" or "bfloat16" -> the MLX dtype; None -> None (the default for the backend)."""
    if name is None:
        return None
    if name not in DTYPES:
        raise UserError(f"dtype {name!r} is not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[name]
