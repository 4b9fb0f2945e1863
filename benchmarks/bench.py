"""mlx-gpt2 against mlx-lm (and transformers) on the same checkpoints: `python -m benchmarks` (`mlx-gpt2 bench`).

For each shape, a Hub-format GPT-2 with random weights is written once (transformers, fixed seed) and
converted by both converters for each dtype (timed). Then, run after run, the engines take turns -- the
order flips every run, each run in a fresh process -- and the medians, minima and maxima go into a
markdown table and a JSON record. See benchmarks/RESULTS.md for what a full run looks like.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from mlx_gpt2.errors import UserError

from . import bench_runs
from .bench_runs import DTYPES, ENGINES, SHAPES

REPO = Path(__file__).resolve().parents[1]  # where `python -m benchmarks.bench_runs` is found
METRICS = ("load_s", "prefill_tps", "prefill_cpu_s", "decode_tps", "decode_cpu_ms", "peak_gb", "rss_peak_gb")
FLOAT_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class BenchOptions:
    shapes: tuple[str, ...] = ("gpt2",)
    dtypes: tuple[str, ...] = ("float32", "bfloat16", "4bit")
    batches: tuple[int, ...] = (1,)
    engines: tuple[str, ...] = ("mlx-gpt2", "mlx-lm", "transformers")
    runs: int = 3
    reference_runs: int = 1  # transformers is the slow reference, not the comparison the targets are about
    prompt_tokens: int = 512
    gen_tokens: int = 256
    batch_prompt_tokens: int = 64  # batch 8 x 512 prompt tokens is minutes of prefill on this CPU
    work_dir: Path = Path("~/.cache/mlx-gpt2/bench")
    isolate: bool = True  # each measurement in a fresh process
    source: Path | None = None  # a Hub-format checkpoint to use instead of random weights (one shape)
    smoke_run: bool = False  # `bench --quick`: a tiny model; its numbers only show that everything runs

    def __post_init__(self) -> None:
        if self.source is None:
            _check_choices("--shapes", self.shapes, SHAPES)
        elif len(self.shapes) != 1:  # the shapes are labels of one checkpoint's rows then
            raise UserError("--model benchmarks one checkpoint; it takes no --shapes")
        _check_choices("--dtypes", self.dtypes, DTYPES)
        _check_choices("--engines", self.engines, ENGINES)
        if any(b < 1 for b in self.batches) or not self.batches:
            raise UserError(f"--batch takes sizes >= 1, got {self.batches}")
        for name in ("runs", "reference_runs", "prompt_tokens", "gen_tokens", "batch_prompt_tokens"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.prompt_tokens + self.gen_tokens > 1024:
            raise UserError("--prompt-tokens + --gen-tokens must fit GPT-2's 1024-position window")

    @classmethod
    def smoke(cls, work_dir: Path, **given) -> BenchOptions:
        """`bench --quick`: seconds, not minutes (a 2-layer model, 16 + 8 tokens, one run, in this process).

        It checks that every engine runs; it measures nothing the headline ratios mean, so it takes only the
        engines to run, and refuses options it would otherwise ignore.
        """
        ignored = sorted(k for k in given if k != "engines")
        if ignored:
            names = ", ".join("--" + ("model" if k == "source" else "batch" if k == "batches" else k.replace("_", "-")) for k in ignored)
            raise UserError(f"--quick is a fixed smoke run and would ignore {names}; drop them, or drop --quick to measure")
        engines = tuple(e for e in given.get("engines", ("mlx-gpt2", "mlx-lm")) if e != "transformers")
        return cls(shapes=("tiny",), dtypes=("float32",), engines=engines or ("mlx-gpt2",), runs=1, prompt_tokens=16,
                   gen_tokens=8, batch_prompt_tokens=8, work_dir=work_dir, isolate=False, smoke_run=True)


def _check_choices(option: str, values: tuple[str, ...], allowed) -> None:
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise UserError(f"{option}: {', '.join(bad) or 'nothing given'}; choose from {', '.join(allowed)}")


def run_step(spec: dict, isolate: bool) -> dict:
    """One bench_runs command, in a fresh process (isolate) or in this one."""
    if not isolate:
        if spec["command"] == "source":
            return {"dir": str(bench_runs.make_source(spec["shape"], Path(spec["dir"])))}
        if spec["command"] == "convert":
            return {"seconds": bench_runs.convert(spec["engine"], Path(spec["source"]), Path(spec["out"]), spec["dtype"])}
        return bench_runs.measure(spec)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_runs", json.dumps(spec)], capture_output=True, text=True,
        cwd=REPO, env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))},
    )
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise UserError(f"benchmark step {spec['command']} {spec.get('engine', '')} failed: {' | '.join(tail)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def applicable(engine: str, dtype: str, batch: int) -> bool:
    """transformers: float dtypes at batch 1; the plain ablation: batch 1; batched mlx-gpt2 needs batch.py."""
    if engine == "transformers":
        return dtype in FLOAT_DTYPES and batch == 1
    if engine == "mlx-gpt2-plain":
        return batch == 1
    return True


def _directories(shape: str, dtype: str, options: BenchOptions, log: Callable[[str], None]) -> tuple[dict, list]:
    """The source checkpoint and each converter's output for (shape, dtype); conversion times."""
    root = options.work_dir.expanduser() / shape
    if options.source is not None:
        source = options.source
    else:
        source = Path(run_step({"command": "source", "shape": shape, "dir": str(root / "hub")}, options.isolate)["dir"])
    dirs, conversions = {"transformers": source}, []
    for converter in ("mlx-gpt2", "mlx-lm"):
        if not any(e.startswith(converter) for e in options.engines):
            continue
        out = root / f"{converter}-{dtype}"
        spec = {"command": "convert", "engine": converter, "source": str(source), "out": str(out), "dtype": dtype}
        seconds = run_step(spec, options.isolate)["seconds"]
        conversions.append({"shape": shape, "dtype": dtype, "engine": converter, "seconds": seconds})
        log(f"converted {shape} {dtype} with {converter} in {seconds:.1f} s")
        dirs[converter] = out
    dirs["mlx-gpt2-plain"] = dirs.get("mlx-gpt2")
    return dirs, conversions


def _measure_spec(engine: str, directory: Path, dtype: str, batch: int, options: BenchOptions) -> dict:
    prompt = options.prompt_tokens if batch == 1 else options.batch_prompt_tokens
    torch_dtype = DTYPES[dtype][0]
    return {"command": "measure", "engine": engine, "dir": str(directory), "batch": batch,
            "prompt_tokens": prompt, "gen_tokens": options.gen_tokens, "torch_dtype": torch_dtype}


def _batch_available() -> bool:
    try:
        from mlx_gpt2.generation.batch import batch_generate_response  # noqa: F401  (the capabilities half of issue 5)
    except ImportError:
        return False
    return True


def benchmark(options: BenchOptions, log: Callable[[str], None] = print) -> dict:
    """Run the whole matrix; return the JSON record (machine, options, every run, conversions)."""
    from mlx_gpt2.doctor import machine_info

    record = {"machine": machine_info(), "options": _jsonable(options), "runs": [], "conversions": [],
              "pending": [], "notes": [], "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    reason = mlx_lm_cannot_read(options.source) if options.source and "mlx-lm" in options.engines else None
    if reason:
        options = dataclasses.replace(options, engines=tuple(e for e in options.engines if e != "mlx-lm"))
        note = f"mlx-lm cannot read {options.source}: {reason}; benchmarking {', '.join(options.engines)} only"
        record["notes"].append(note)
        log(note)
    for shape in options.shapes:
        for dtype in options.dtypes:
            dirs, conversions = _directories(shape, dtype, options, log)
            record["conversions"] += conversions
            for batch in options.batches:
                engines = [e for e in options.engines if applicable(e, dtype, batch)]
                if batch > 1 and not _batch_available():
                    record["pending"].append(f"{shape} {dtype} batch {batch}: mlx_gpt2.batch is not there yet")
                    engines = [e for e in engines if not e.startswith("mlx-gpt2")]
                record["runs"] += _runs(shape, dtype, batch, engines, dirs, options, log)
    record["machine"]["loadavg_end"] = _loadavg()
    record["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    return record


def mlx_lm_cannot_read(directory: Path) -> str | None:
    """Why mlx-lm's GPT-2 cannot load this Hub-format checkpoint, or None if it can (mlx-lm 0.32)."""
    from mlx_gpt2.config import read_config_json
    from mlx_gpt2.convert.read import read_tensors

    if "n_ctx" not in read_config_json(Path(directory) / "config.json"):
        return "its config.json has no n_ctx, which mlx-lm's GPT-2 requires (transformers' save_pretrained leaves it out)"
    if any(name.startswith("transformer.") for name in read_tensors(Path(directory))):  # headers only: lazy
        return "its tensors are named transformer.* (transformers' save_pretrained layout), which mlx-lm does not strip"
    return None


def _runs(shape: str, dtype: str, batch: int, engines: list[str], dirs: dict, options: BenchOptions,
          log: Callable[[str], None]) -> list[dict]:
    """`options.runs` rounds of every engine on one (shape, dtype, batch); who goes first alternates."""
    results = []
    for run in range(options.runs):
        order = [e for e in engines if e != "transformers" or run < options.reference_runs]
        for engine in order if run % 2 == 0 else order[::-1]:
            result = run_step(_measure_spec(engine, dirs[engine], dtype, batch, options), options.isolate)
            result.update(shape=shape, dtype=dtype, batch=batch, engine=engine, run=run)
            results.append(result)
            log(_progress(result))
    return results


def _progress(r: dict) -> str:
    return (f"{r['shape']} {r['dtype']} b{r['batch']} {r['engine']:<15} run {r['run']}: load {r['load_s']:.2f} s, "
            f"prefill {r['prefill_tps']:.1f} tok/s, decode {r['decode_tps']:.2f} tok/s"
            + (f", peak {r['peak_gb']:.3f} GB" if "peak_gb" in r else ""))


def _loadavg() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def _jsonable(options: BenchOptions) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(options).items()}


def _stats(values: list[float]) -> dict | None:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)} if values else None


def _order(key: tuple) -> tuple:
    """Rows in a fixed order whatever order the records came in: shape, batch, dtype, engine."""
    shape, dtype, batch, *engine = key
    rank = lambda seq, x: list(seq).index(x) if x in seq else len(seq)
    return (rank(SHAPES, shape), shape, batch, rank(DTYPES, dtype), *(rank(ENGINES, e) for e in engine))


def summarize(record: dict) -> list[dict]:
    """One row per (shape, dtype, batch, engine): median, min and max of every metric over the runs."""
    groups: dict[tuple, list[dict]] = {}
    for r in sorted(record["runs"], key=lambda r: _order((r["shape"], r["dtype"], r["batch"], r["engine"]))):
        groups.setdefault((r["shape"], r["dtype"], r["batch"], r["engine"]), []).append(r)
    rows = []
    for (shape, dtype, batch, engine), runs in groups.items():
        row = {"shape": shape, "dtype": dtype, "batch": batch, "engine": engine, "n": len(runs), "tokens": runs[0]["tokens"]}
        row.update({m: _stats([r[m] for r in runs if m in r]) for m in METRICS})
        rows.append(row)
    return rows


def _per_run_ratio(record: dict, key: tuple, metric: str, a: str, b: str, invert: bool = False) -> dict | None:
    """Median/min/max over runs of engine a's metric over engine b's, pairing run i with run i."""
    pick = lambda e: {r["run"]: r.get(metric) for r in record["runs"] if (r["shape"], r["dtype"], r["batch"], r["engine"]) == (*key, e)}
    x, y = pick(a), pick(b)
    pairs = [(x[i], y[i]) for i in x if i in y and x[i] and y[i]]
    return _stats([(q / p) if invert else (p / q) for p, q in pairs])


def ratios(record: dict) -> list[dict]:
    """mlx-gpt2 over mlx-lm (and over transformers) for each (shape, dtype, batch)."""
    keys = sorted(set((r["shape"], r["dtype"], r["batch"]) for r in record["runs"]), key=_order)
    rows = {(r["shape"], r["dtype"], r["batch"], r["engine"]): r for r in summarize(record)}
    out = []
    for key in keys:
        ours, lm = rows.get((*key, "mlx-gpt2")), rows.get((*key, "mlx-lm"))
        entry = {"shape": key[0], "dtype": key[1], "batch": key[2]}
        if ours and lm:
            entry.update(
                decode=_per_run_ratio(record, key, "decode_tps", "mlx-gpt2", "mlx-lm"),
                prefill=_per_run_ratio(record, key, "prefill_tps", "mlx-gpt2", "mlx-lm"),
                prefill_cpu=_per_run_ratio(record, key, "prefill_cpu_s", "mlx-gpt2", "mlx-lm", invert=True),
                decode_cpu=_per_run_ratio(record, key, "decode_cpu_ms", "mlx-gpt2", "mlx-lm", invert=True),
                memory=_per_run_ratio(record, key, "peak_gb", "mlx-gpt2", "mlx-lm"),
                load=_per_run_ratio(record, key, "load_s", "mlx-gpt2", "mlx-lm", invert=True),
                same_tokens=ours["tokens"] == lm["tokens"],
            )
        reference = rows.get((*key, "transformers"))
        if ours and reference:  # transformers usually runs once: a ratio of medians, not of paired runs
            entry["vs_transformers_decode"] = _stats([ours["decode_tps"]["median"] / reference["decode_tps"]["median"]])
        if ours and rows.get((*key, "mlx-gpt2-plain")):
            entry["vs_plain_decode"] = _per_run_ratio(record, key, "decode_tps", "mlx-gpt2", "mlx-gpt2-plain")
        out.append(entry)
    return out


def _fmt(stat: dict | None, digits: int = 2, suffix: str = "") -> str:
    if not stat:
        return "–"
    m, lo, hi = stat["median"], stat["min"], stat["max"]
    if lo == hi:
        return f"{m:.{digits}f}{suffix}"
    return f"{m:.{digits}f}{suffix} ({lo:.{digits}f}–{hi:.{digits}f})"


SMOKE_NOTE = ("SMOKE RUN (bench --quick): a 2-layer model, 16 + 8 tokens, one run in one process. It shows that "
              "every engine runs; its speed, memory and load numbers mean nothing. Run without --quick to measure.")


def markdown(record: dict) -> str:
    """The tables of RESULTS.md: absolute numbers per engine, ratios, conversion times."""
    smoke = [SMOKE_NOTE, ""] if record.get("options", {}).get("smoke_run") else []
    notes = [*smoke, *(f"Note: {n}" for n in record.get("notes", [])), *([""] if record.get("notes") else [])]
    lines = [*notes, "| shape | dtype | batch | engine | runs | load s | prefill tok/s | prefill CPU s | decode tok/s | decode CPU ms/tok | peak MLX GB | peak RSS GB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in summarize(record):
        lines.append(f"| {r['shape']} | {r['dtype']} | {r['batch']} | {r['engine']} | {r['n']} | {_fmt(r['load_s'])} | "
                     f"{_fmt(r['prefill_tps'], 1)} | {_fmt(r['prefill_cpu_s'], 1)} | {_fmt(r['decode_tps'])} | {_fmt(r['decode_cpu_ms'], 1)} | "
                     f"{_fmt(r['peak_gb'], 3)} | {_fmt(r['rss_peak_gb'], 2)} |")
    lines += ["", "Ratios, mlx-gpt2 over mlx-lm (median of per-run ratios, min–max); > 1 is better for us except memory:", "",
              "| shape | dtype | batch | decode × | decode CPU time × | prefill × | prefill CPU time × | peak memory × | load × | same greedy tokens | decode × transformers | decode × plain path |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for e in ratios(record):
        same = {True: "yes", False: "no"}.get(e.get("same_tokens"), "–")
        lines.append(f"| {e['shape']} | {e['dtype']} | {e['batch']} | {_fmt(e.get('decode'), 2, '×')} | {_fmt(e.get('decode_cpu'), 2, '×')} | "
                     f"{_fmt(e.get('prefill'), 2, '×')} | {_fmt(e.get('prefill_cpu'), 2, '×')} | {_fmt(e.get('memory'), 2, '×')} | {_fmt(e.get('load'), 2, '×')} | {same} | "
                     f"{_fmt(e.get('vs_transformers_decode'), 2, '×')} | {_fmt(e.get('vs_plain_decode'), 2, '×')} |")
    lines += _conversion_table(record["conversions"])
    lines += [f"Pending: {p}" for p in record.get("pending", [])]
    return "\n".join(lines)


def _conversion_table(conversions: list[dict]) -> list[str]:
    """Seconds per converter for each (shape, dtype): median (min–max) over every conversion recorded."""
    if not conversions:
        return []
    times: dict[tuple, dict[str, list[float]]] = {}
    for c in sorted(conversions, key=lambda c: _order((c["shape"], c["dtype"], 1))):
        times.setdefault((c["shape"], c["dtype"]), {}).setdefault(c["engine"], []).append(c["seconds"])
    lines = ["", "| shape | dtype | conversions | mlx-gpt2 convert s | mlx_lm.convert s | mlx-gpt2 speed × |",
             "| --- | --- | --- | --- | --- | --- |"]
    for (shape, dtype), t in times.items():
        ours, lm = _stats(t.get("mlx-gpt2", [])), _stats(t.get("mlx-lm", []))
        ratio = f"{lm['median'] / ours['median']:.2f}×" if ours and lm else "–"
        n = max(len(v) for v in t.values())
        lines.append(f"| {shape} | {dtype} | {n} | {_fmt(ours)} | {_fmt(lm)} | {ratio} |")
    return lines
