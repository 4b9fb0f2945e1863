"""CLI commands for LoRA fine-tuning (`lora`, `fuse`): parse, call the API, print."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this area's commands to the main app."""
