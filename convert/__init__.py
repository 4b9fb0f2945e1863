"""Hub -> MLX conversion: download, read any GPT-2 layout, rename/transpose, check, write atomically."""

from mlx_gpt2.convert.convert import convert, read_model_dir, write_model_dir
from mlx_gpt2.convert.hub import resolve_source

__all__ = ["convert", "read_model_dir", "resolve_source", "write_model_dir"]
