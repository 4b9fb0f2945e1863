"""`generate` and `cache-prompt`: parse, call the generation API, print."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import List, Optional

import typer

from ..errors import UserError
from .common import (
    DECODING,
    INPUT,
    MODEL,
    OUTPUT,
    SAMPLING,
    STOPPING,
    command,
    dtype_option,
    force_option,
    model_option,
    parse_logit_bias,
    read_prompt,
    read_text_file,
    revision_option,
)

BEAMS = "Beam search"
STRUCTURE = "Structured output"


def register(app: typer.Typer) -> None:
    command(app, "generate")(generate)
    command(app, "cache-prompt")(cache_prompt)


def generate(
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="The prompt; '-' reads stdin (one trailing newline dropped).", rich_help_panel=INPUT),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", help="Read the prompt exactly from FILE ('-': stdin).", rich_help_panel=INPUT),
    prompt_cache: Optional[Path] = typer.Option(None, "--prompt-cache", help="A file from `mlx-gpt2 cache-prompt`; the prompt continues its text.", rich_help_panel=INPUT),
    model: Optional[str] = model_option("Hub repo id or directory (default: gpt2, or the base --adapter-path was trained on).", default=None),
    adapter_path: Optional[Path] = typer.Option(None, "--adapter-path", help="LoRA adapters saved by `mlx-gpt2 lora`.", rich_help_panel=MODEL),
    dtype: Optional[str] = dtype_option(),
    revision: Optional[str] = revision_option(),
    max_tokens: int = typer.Option(100, "--max-tokens", "-n", help="How many tokens to generate at most.", rich_help_panel=STOPPING),
    stop: List[str] = typer.Option([], "--stop", metavar="TEXT", help="Stop before this string (repeatable); it is not printed.", rich_help_panel=STOPPING),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="Keep going past <|endoftext|>.", rich_help_panel=STOPPING),
    on_overflow: str = typer.Option("slide", "--on-overflow", help="Past the 1024-token window: slide, stop or error.", rich_help_panel=STOPPING),
    temp: float = typer.Option(0.0, "--temp", help="Sampling temperature; 0 is greedy.", rich_help_panel=SAMPLING),
    top_k: int = typer.Option(0, "--top-k", help="Keep the k most likely tokens (0: off).", rich_help_panel=SAMPLING),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass (1: off).", rich_help_panel=SAMPLING),
    min_p: float = typer.Option(0.0, "--min-p", help="Drop tokens below min_p x the top probability (0: off).", rich_help_panel=SAMPLING),
    repetition_penalty: Optional[float] = typer.Option(None, "--repetition-penalty", help="CTRL penalty; > 1 discourages repeats.", rich_help_panel=SAMPLING),
    logit_bias: List[str] = typer.Option([], "--logit-bias", metavar="ID:BIAS", help="Add BIAS to token ID's logit (repeatable; -inf bans it).", rich_help_panel=SAMPLING),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed: the same seed gives the same text.", rich_help_panel=SAMPLING),
    draft_model: Optional[str] = typer.Option(None, "--draft-model", help="Speculative decoding: a small model with the same tokenizer.", rich_help_panel=DECODING),
    num_draft: int = typer.Option(3, "--num-draft", help="Tokens the draft model proposes per step (>= 1).", rich_help_panel=DECODING),
    num_beams: int = typer.Option(1, "--num-beams", help="Beam search with this many beams (1: off); greedy, not streamed.", rich_help_panel=BEAMS),
    length_penalty: Optional[float] = typer.Option(None, "--length-penalty", help="Beam score = log-prob sum / length ** this (default 1).", rich_help_panel=BEAMS),
    early_stopping: bool = typer.Option(False, "--early-stopping", help="End once num_beams hypotheses are finished.", rich_help_panel=BEAMS),
    json_schema: Optional[str] = typer.Option(None, "--json-schema", metavar="FILE|JSON", help="The output is JSON valid under this schema (a file, or the schema itself).", rich_help_panel=STRUCTURE),
    regex: Optional[str] = typer.Option(None, "--regex", metavar="PATTERN", help="The output matches this regular expression, whole.", rich_help_panel=STRUCTURE),
    grammar: Optional[Path] = typer.Option(None, "--grammar", metavar="FILE", help="The output follows this Lark grammar (llguidance's dialect).", rich_help_panel=STRUCTURE),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Print speed, peak memory and the BLAS in use to stderr.", rich_help_panel=OUTPUT),
) -> None:
    """Generate text from a prompt.

    The text streams to stdout as it is generated; --verbose adds the numbers on stderr.
    """
    from .. import SamplingOptions, load
    from ..lora.layers import recorded_base

    text = read_prompt(prompt, file=prompt_file)
    sampling = SamplingOptions(temp=temp, top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
                               logit_bias=parse_logit_bias(logit_bias), seed=seed)  # fmt: skip
    lm, tokenizer = load(recorded_base(model, adapter_path), revision=revision, dtype=dtype, adapter_path=adapter_path)
    sampling = _constrained(sampling, tokenizer, json_schema, regex, grammar)
    if num_beams != 1 or length_penalty is not None or early_stopping:
        conflicts = {"--temp": temp != 0, "--top-k": top_k != 0, "--top-p": top_p != 1, "--min-p": min_p != 0,
                     "--repetition-penalty": repetition_penalty is not None, "--logit-bias": logit_bias, "--stop": stop,
                     "--draft-model": draft_model, "--prompt-cache": prompt_cache}  # fmt: skip
        beams = (num_beams, max_tokens, length_penalty, early_stopping, ignore_eos, sampling.constraint)
        return _generate_beams(lm, tokenizer, text, beams, conflicts, verbose)
    _stream(lm, tokenizer, text, dict(max_tokens=max_tokens, sampling=sampling, stop=stop or None, ignore_eos=ignore_eos,
                                      on_overflow=on_overflow), prompt_cache, (draft_model, num_draft, dtype), verbose)  # fmt: skip


def _constrained(sampling, tokenizer, json_schema: str | None, regex: str | None, grammar: Path | None):
    """`sampling` with the constraint the options give (a schema file or inline JSON; a grammar file)."""
    import dataclasses

    from ..generation.constrained import Constraint

    if json_schema is not None and not json_schema.lstrip().startswith("{"):
        json_schema = read_text_file(Path(json_schema), what="--json-schema")
    lark = read_text_file(grammar, what="--grammar") if grammar is not None else None
    constraint = Constraint.of(tokenizer, json_schema=json_schema, regex=regex, grammar=lark)
    return sampling if constraint is None else dataclasses.replace(sampling, constraint=constraint)


def _stream(lm, tokenizer, text: str, options: dict, prompt_cache: Path | None, draft_spec: tuple, verbose: bool) -> None:
    """Stream the text to stdout, from a prompt cache and with a draft model when asked."""
    from .. import load, stream_generate
    from ..generation.speculative import Draft

    draft_model, num_draft, dtype = draft_spec
    draft = Draft(load(draft_model, dtype=dtype)[0], num_draft=num_draft) if draft_model else None
    cache, ids = None, text
    if prompt_cache is not None:
        from ..generation.prompt_cache import prepare_cached_prompt

        cache, ids = prepare_cached_prompt(prompt_cache, lm, tokenizer, text)
    last, drafted = None, 0
    for last in stream_generate(lm, tokenizer, ids, cache=cache, draft=draft, **options):
        drafted += last.from_draft
        sys.stdout.write(last.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if verbose and last is not None:
        _report(last, drafted if draft is not None else None)


def _report(last, drafted: int | None) -> None:
    """--verbose: prompt tokens computed and taken from a prompt cache are counted apart."""
    computed = last.prompt_tokens - last.prompt_cached_tokens
    cached = f" ({last.prompt_cached_tokens} from the prompt cache, {computed} computed)" if last.prompt_cached_tokens else ""
    lines = [
        f"prompt: {last.prompt_tokens} tokens{cached}, {last.prompt_tps:.2f} tokens/s computed",
        f"generation: {last.generation_tokens} tokens, {last.generation_tps:.2f} tokens/s",
        f"peak memory: {last.peak_memory:.3f} GB", f"finish reason: {last.finish_reason}", blas_line(),
    ]
    if drafted is not None:
        lines.append(f"draft: {drafted} of {last.generation_tokens} tokens proposed by the draft model")
    typer.echo("\n".join(lines), err=True)


def blas_line() -> str:
    """Which BLAS multiplies matrices in this process (the one-line note --verbose prints)."""
    from ..blas import describe_choice

    return f"blas: {describe_choice()}"


def _generate_beams(lm, tokenizer, text: str, beams: tuple, conflicts: dict, verbose: bool) -> None:
    """`generate --num-beams`: beam search is greedy and whole-sequence, so it prints its text at the end."""
    import mlx.core as mx

    from ..generation.beam import beam_search

    num_beams, max_tokens, length_penalty, early_stopping, ignore_eos, constraint = beams
    if num_beams == 1:
        raise UserError("--length-penalty and --early-stopping apply to beam search: add --num-beams N (N >= 2)")
    given = [flag for flag, value in conflicts.items() if value]
    if given:
        raise UserError(f"--num-beams is greedy beam search and does not combine with {', '.join(given)}")
    mx.reset_peak_memory()
    tic = time.perf_counter()
    result = beam_search(lm, tokenizer, [text], num_beams=num_beams, max_tokens=max_tokens,
                         length_penalty=1.0 if length_penalty is None else length_penalty,
                         early_stopping=early_stopping, ignore_eos=ignore_eos, constraint=constraint)[0]  # fmt: skip
    seconds = time.perf_counter() - tic
    typer.echo(result.text)
    if verbose:
        n = len(tokenizer.encode(text)) if text else 1
        typer.echo(
            f"prompt: {n} tokens\ngeneration: {len(result.tokens)} tokens of the best of {num_beams} beams in "
            f"{seconds:.2f} s ({len(result.tokens) / max(seconds, 1e-9):.2f} tokens/s, prompt included)\n"
            f"score: {result.score:.4f} (log-prob sum / length ** length_penalty)\n"
            f"peak memory: {mx.get_peak_memory() / 1e9:.3f} GB\nfinish reason: {result.finish_reason}\n{blas_line()}",
            err=True,
        )


def cache_prompt(
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="The prefix to cache; '-' reads stdin (one trailing newline dropped).", rich_help_panel=INPUT),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", help="Read the prefix exactly from FILE ('-': stdin).", rich_help_panel=INPUT),
    model: str = model_option(),
    dtype: Optional[str] = dtype_option(),
    revision: Optional[str] = revision_option(),
    out: Path = typer.Option(..., "--out", "-o", help="The cache file to write (safetensors).", rich_help_panel=OUTPUT),
    force: bool = force_option("Replace an existing file at --out."),
) -> None:
    """Save the KV cache of a prompt prefix.

    `generate --prompt-cache FILE --prompt REST` continues from it without computing it again.
    """
    from .. import load
    from ..convert import resolve_source
    from ..fileio import check_output, claim_output
    from ..generation.prompt_cache import cache_prompt as save_cache

    check_output(out, force=force, kind="file")  # before the load: fail fast
    text = read_prompt(prompt, file=prompt_file)
    with claim_output(out, force=force, inputs=[resolve_source(model, revision=revision)], kind="file") as path:
        lm, tokenizer = load(model, revision=revision, dtype=dtype)
        n = save_cache(lm, tokenizer, text, path)
    typer.echo(f"wrote {out} ({n} tokens)")
