"""Merge `mlx-gpt2 bench --json` records into one set of tables (the ones in RESULTS.md).

    python benchmarks/report.py benchmarks/results/*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from benchmarks.bench import markdown


def merge(paths: list[Path]) -> dict:
    records = [json.loads(p.read_text()) for p in paths]
    return {
        "machine": records[0]["machine"],
        "runs": [r for rec in records for r in rec["runs"]],
        "conversions": [c for rec in records for c in rec["conversions"]],
        "pending": [p for rec in records for p in rec.get("pending", [])],
    }


def machine_line(machine: dict) -> str:
    return (f"{machine['cpu']}, {machine['cores']} cores, {machine['platform']}; MLX {machine['mlx']} "
            f"({machine['backend']} backend, BLAS: {machine['blas']}); mlx-lm {machine['mlx_lm']}; "
            f"torch {machine['torch']}; transformers {machine['transformers']}; Python {machine['python']}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python benchmarks/report.py RESULT.json [...]")
    record = merge([Path(p) for p in sys.argv[1:]])
    print(machine_line(record["machine"]) + "\n")
    print(markdown(record))
