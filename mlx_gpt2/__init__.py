"""mlx-gpt2: GPT-2 in MLX — convert, generate, quantize, fine-tune and look inside."""

from .batch import BatchResponse, batch_generate, batch_generate_response
from .beam import BeamResult, beam_generate, beam_search
from .cache import KVCache, make_cache
from .config import GPT2Config
from .errors import CheckpointError, UserError
from .generate import GenerationResponse, generate, generate_step, stream_generate
from .loading import load
from .model import GPT2
from .perplexity import PerplexityResult, perplexity
from .prompt_cache import load_prompt_cache, make_prompt_cache, save_prompt_cache
from .quantize import QuantizeConfig, bits_per_weight, quantize_model
from .sampling import make_logits_processors, make_sampler
from .speculative import speculative_generate_step
from .tokenizer import Tokenizer

__version__ = "0.1.0"
__all__ = [
    "GPT2", "GPT2Config", "GenerationResponse", "KVCache", "CheckpointError", "Tokenizer", "UserError",
    "generate", "generate_step", "load", "make_cache", "make_logits_processors", "make_sampler",
    "stream_generate",
    "BatchResponse", "BeamResult", "batch_generate", "batch_generate_response", "beam_generate", "beam_search",
    "load_prompt_cache", "make_prompt_cache", "save_prompt_cache", "speculative_generate_step",
    "PerplexityResult", "QuantizeConfig", "bits_per_weight", "perplexity", "quantize_model",
]
