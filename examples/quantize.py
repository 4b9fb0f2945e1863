"""Convert GPT-2 to 4 bits, load it, measure what quantizing cost, and generate: public API only.

    python examples/quantize.py                          # downloads gpt2 from the Hub once
    python examples/quantize.py path/to/model /tmp/gpt2-4bit
"""

import sys
from pathlib import Path

from mlx_gpt2 import QuantizeConfig, load, perplexity, stream_generate
from mlx_gpt2.convert import convert

source = sys.argv[1] if len(sys.argv) > 1 else "gpt2"
out = Path(sys.argv[2] if len(sys.argv) > 2 else "gpt2-4bit")

# 4 bits, 64 weights per scale; the tied embedding/output head too (keep_embeddings=True leaves it float).
convert(source, out, quantize=QuantizeConfig(bits=4, group_size=64), force=True)
size_mb = sum(p.stat().st_size for p in out.iterdir()) / 1e6
print(f"wrote {out}: {size_mb:.1f} MB")

model, tokenizer = load(out)  # lazy: weights come off disk on first use

# What did 4 bits cost? Compare with the float model on some English (kept short: CPUs are slow at this).
text = (
    "Quantization stores each weight in a few bits, with one scale and one offset for every group of 64 "
    "weights. The model gets smaller and faster to read from memory, and a little less accurate. How much "
    "less is a question for measurement: perplexity on text the model has not seen answers it."
)
float_model, _ = load(source)
for name, m in [("float", float_model), ("4-bit", model)]:
    result = perplexity(m, tokenizer, text, context=64, stride=32)
    print(f"{name}: perplexity {result.perplexity:.2f} over {result.tokens} tokens")

prompt = "The meaning of life is"
print(prompt, end="", flush=True)
for response in stream_generate(model, tokenizer, prompt, max_tokens=40):
    print(response.text, end="", flush=True)
print(f"\n[{response.generation_tps:.1f} tokens/s, peak memory {response.peak_memory * 1e3:.0f} MB]")
