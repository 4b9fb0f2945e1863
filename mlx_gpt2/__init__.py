"""mlx-gpt2: GPT-2 in MLX — convert, generate, quantize, fine-tune and look inside.

The public API is imported on first use (`from mlx_gpt2 import load` imports `mlx_gpt2.loading` then),
so `import mlx_gpt2` and the command line start without importing MLX until a command needs it.
"""

from __future__ import annotations

from .exports import install

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "BatchResponse": "generation.batch", "batch_generate": "generation.batch",
    "batch_generate_response": "generation.batch",
    "BeamResult": "generation.beam", "beam_generate": "generation.beam", "beam_search": "generation.beam",
    "KVCache": "cache", "make_cache": "cache",
    "GPT2Config": "config",
    "CheckpointError": "errors", "UserError": "errors",
    "GenerationResponse": "generation.generate", "generate": "generation.generate",
    "generate_step": "generation.generate", "stream_generate": "generation.generate",
    "load": "loading",
    "GPT2": "model", "check_ids": "model",
    "PerplexityResult": "perplexity", "perplexity": "perplexity",
    "load_prompt_cache": "generation.prompt_cache", "make_prompt_cache": "generation.prompt_cache",
    "save_prompt_cache": "generation.prompt_cache",
    "QuantizeConfig": "quant.quantize", "bits_per_weight": "quant.quantize", "quantize_model": "quant.quantize",
    "SamplingOptions": "generation.sampling", "make_logits_processors": "generation.sampling",
    "make_sampler": "generation.sampling",
    "Draft": "generation.speculative", "speculative_generate_step": "generation.speculative",
    "Tokenizer": "tokenizer",
}  # fmt: skip
install(__name__, _EXPORTS)
