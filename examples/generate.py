"""Generate text with GPT-2, using only mlx-gpt2's public API.

    python examples/generate.py                       # downloads gpt2 from the Hub once
    python examples/generate.py path/to/model "Once upon a time"
"""

import sys

from mlx_gpt2 import load, stream_generate

model_name = sys.argv[1] if len(sys.argv) > 1 else "gpt2"
prompt = sys.argv[2] if len(sys.argv) > 2 else "The meaning of life is"

model, tokenizer = load(model_name)
print(prompt, end="", flush=True)
for response in stream_generate(model, tokenizer, prompt, max_tokens=60, temp=0.8, top_p=0.95, seed=0):
    print(response.text, end="", flush=True)
print(f"\n\n[{response.generation_tokens} tokens, {response.generation_tps:.1f} tokens/s, "
      f"peak memory {response.peak_memory:.2f} GB]")
