"""Fine-tune GPT-2 with LoRA, watch the validation loss fall, fuse the adapters, and generate: public API only.

    python examples/lora_finetune.py gpt2                              # a small set made from Python's docs
    python examples/lora_finetune.py ./gpt2-mlx --data ./my-data --iters 200 --out runs/mine

`--data` is a directory with train.jsonl / valid.jsonl ({"text": ...} or {"prompt": ..., "completion": ...}
per line), or a .txt file. Without it, the script writes a small dataset from the documentation that ships
with Python. Stop it with Ctrl-C at any time and run it again with --resume: it continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mlx_gpt2 import UserError, generate, load
from mlx_gpt2.lora import TrainConfig, fuse, train


def sample_data(directory: Path) -> Path:
    """Python's documentation topics, one {"text"} line each, the last eight held out for validation."""
    from pydoc_data.topics import topics

    lines = [json.dumps({"text": topics[name][:2000]}) for name in sorted(topics)]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "train.jsonl").write_text("\n".join(lines[:-8]) + "\n")
    (directory / "valid.jsonl").write_text("\n".join(lines[-8:]) + "\n")
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="Hub repo id or GPT-2 directory")
    parser.add_argument("--data", type=Path, help="training data (default: a sample made from Python's docs)")
    parser.add_argument("--out", type=Path, default=Path("runs/lora-example"))
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--prompt", default="The with statement")
    parser.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    args = parser.parse_args()

    data = args.data or sample_data(args.out / "data")
    adapters = args.out / "adapters"
    result = train(TrainConfig(model=args.model, data=str(data), adapter_path=str(adapters), iters=args.iters,
                               steps_per_eval=max(args.iters // 4, 1), resume=args.resume))  # fmt: skip
    if result.val_losses:
        print(f"validation loss: {result.val_losses[0][1]:.3f} (step {result.val_losses[0][0]}) -> "
              f"{result.val_losses[-1][1]:.3f} (step {result.val_losses[-1][0]})")  # fmt: skip

    base, tokenizer = load(args.model)
    tuned, _ = load(args.model, adapter_path=adapters)
    print("base:     ", generate(base, tokenizer, args.prompt, max_tokens=40))
    print("adapters: ", generate(tuned, tokenizer, args.prompt, max_tokens=40))

    fused_dir = fuse(None, adapters, args.out / "fused", force=True)  # None: the base the adapters recorded
    fused, tokenizer = load(fused_dir)
    print("fused:    ", generate(fused, tokenizer, args.prompt, max_tokens=40))
    hf_dir = fuse(args.model, adapters, args.out / "fused-hf", export_hf=True, force=True)
    print(f"transformers can load {hf_dir} with GPT2LMHeadModel.from_pretrained")


if __name__ == "__main__":
    try:
        main()
    except UserError as error:
        sys.exit(f"error: {error}")
