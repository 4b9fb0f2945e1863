"""Hub -> MLX conversion: download, read any GPT-2 layout, rename/transpose, check, write atomically."""

from .convert import convert, read_model_dir, write_model_dir
from .hub import resolve_source

__all__ = ["convert", "read_model_dir", "resolve_source", "write_model_dir"]
