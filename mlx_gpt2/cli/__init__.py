"""The `mlx-gpt2` command line: each command parses its options, calls the public API, and prints.

One module per area registers its commands on `app`; `common` holds what they share (errors as one line,
help in panels, prompt reading, shared options). Nothing here computes: it all lives in the API.
"""

from __future__ import annotations

import typer

from . import convert, generate, inside, inspect, lora, quant, serve, tools
from .common import Group

app = typer.Typer(
    cls=Group, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
    help="GPT-2 in MLX: convert, generate, quantize, fine-tune and inspect.",
)
for _area in (generate, serve, convert, quant, lora, tools, inspect, inside):
    _area.register(app)

__all__ = ["app"]
