"""Generation: one engine (`core`: prefill, the window, cache reuse, text streams) under every generator.

`sampling` turns one frozen `SamplingOptions` into a sampler and logits processors; `generate` is the
single-prompt path (generate_step -> stream_generate -> generate), `batch` many prompts at once, `beam`
beam search on the batch, `speculative` a draft model's proposals checked by the target, `prompt_cache`
saved KV caches of long prefixes.
"""
