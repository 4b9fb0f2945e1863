"""mlx-gpt2: GPT-2 in MLX — convert, generate, quantize, fine-tune and look inside."""

from .cache import KVCache, make_cache
from .config import GPT2Config
from .errors import CheckpointError, UserError
from .generate import GenerationResponse, generate, generate_step, stream_generate
from .loading import load
from .model import GPT2
from .sampling import make_logits_processors, make_sampler
from .tokenizer import Tokenizer

__version__ = "0.1.0"
__all__ = [
    "GPT2", "GPT2Config", "GenerationResponse", "KVCache", "CheckpointError", "Tokenizer", "UserError",
    "generate", "generate_step", "load", "make_cache", "make_logits_processors", "make_sampler",
    "stream_generate",
]
