"""`mlx-gpt2 doctor`: what MLX runs on here, how fast its matrix products are, and how to make them faster.

On Linux the `mlx-cpu` wheel bundles netlib's reference BLAS, which multiplies float32 matrices at a
few GFLOP/s. Where a system OpenBLAS exists, preloading it (`LD_PRELOAD`) makes MLX's own `cblas_sgemm`
calls resolve to OpenBLAS instead -- the same MLX, the same results (checked here against numpy in
float64), tens of times faster. `measure()` runs in a subprocess so the library can be swapped per run.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from .backend import backend_name, default_dtype, prefers_input_major, prefill_step
from .blas import CHOSEN, HOW_TO_GET_ONE, describe_choice, find_openblas
from .errors import UserError

HEAD_SHAPE = (50257, 768)  # gpt2's output head: the largest product of every decoded token
BLOCK_SHAPE = (3072, 768)  # gpt2's MLP up-projection: the typical product inside a block


def version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def loaded_blas() -> list[str]:
    """Paths of the BLAS libraries mapped into this process (Linux; empty elsewhere)."""
    mx.eval(mx.ones((2, 2)) @ mx.ones((2, 2)))  # make sure MLX's CPU matmul has run
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    paths = {line.split()[-1] for line in maps if "/" in line and "blas" in line.rsplit("/", 1)[-1].lower()}
    # numpy's own OpenBLAS exports suffixed symbols (scipy_cblas_sgemm64_), so it never serves MLX.
    return sorted(p for p in paths if "scipy_openblas" not in p and "numpy.libs" not in p)


def blas_kind(paths: list[str]) -> str:
    """Which BLAS serves MLX's CPU matmul: a preloaded OpenBLAS wins over the bundled reference one."""
    names = " ".join(Path(p).name.lower() for p in paths)
    if "openblas" in names:
        return "OpenBLAS"
    if "mkl" in names:
        return "MKL"
    if any("mlx_cpu.libs" in p or Path(p).name.startswith("libblas") for p in paths):
        return "reference BLAS (netlib, bundled with mlx-cpu)"
    if platform.system() == "Darwin":
        return "Accelerate"
    return "unknown"


def _best_seconds(fn, repeats: int) -> float:
    mx.eval(fn())  # warm up
    best = float("inf")
    for _ in range(repeats):
        tic = time.perf_counter()
        mx.eval(fn())
        best = min(best, time.perf_counter() - tic)
    return best


def gemm_gflops(n: int = 1024, repeats: int = 3) -> float:
    """float32 n x n x n matrix product on the default device, in GFLOP/s (best of `repeats`)."""
    a, b = mx.random.normal((n, n), key=mx.random.key(1)), mx.random.normal((n, n), key=mx.random.key(2))
    mx.eval(a, b)
    return 2 * n**3 / _best_seconds(lambda: a @ b, repeats) / 1e9


def gemv_ms(shape: tuple[int, int] = HEAD_SHAPE, repeats: int = 3) -> dict[str, float]:
    """One decoded token's x @ W.T for W of `shape` (out, in), float32, in both weight layouts, in ms."""
    n, k = shape
    w = ((mx.arange(n * k) % 997).reshape(n, k) - 498.0) * 4e-5  # any values do; random ones take seconds to draw
    w_in_major = mx.contiguous(w.T).T  # same values, (in, out) memory: see backend.py
    x = mx.random.normal((1, k), key=mx.random.key(4))
    mx.eval(w, w_in_major, x)
    return {layout: 1e3 * _best_seconds(lambda: x @ weight.T, repeats)
            for layout, weight in (("checkpoint", w), ("input-major", w_in_major))}


def matmul_error(n: int = 384) -> float:
    """Max relative error of MLX's float32 matmul against numpy in float64 (about 1e-6 is right)."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n)).astype(np.float32), rng.standard_normal((n, n)).astype(np.float32)
    ours = np.array(mx.array(a) @ mx.array(b))
    reference = a.astype(np.float64) @ b.astype(np.float64)
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


def measure(quick: bool = False) -> dict:
    """This process's BLAS, its GEMM speed, the decode head's speed, and its numerics."""
    paths = loaded_blas()
    return {
        "blas": blas_kind(paths), "blas_paths": paths,
        "gemm_gflops": gemm_gflops(256 if quick else 1024, 1 if quick else 3),
        "head_ms": gemv_ms(HEAD_SHAPE, 1 if quick else 3), "block_gemv_ms": gemv_ms(BLOCK_SHAPE, 1 if quick else 5),
        "matmul_rel_error": matmul_error(),
    }


def measure_in_subprocess(preload: str | None, quick: bool = False) -> dict:
    """`measure()` in a fresh Python, with `preload` in LD_PRELOAD (or with the BLAS MLX ships)."""
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    env.pop(CHOSEN, None)
    if preload:
        env["LD_PRELOAD"] = preload
    args = [sys.executable, "-m", "mlx_gpt2.doctor"] + (["--quick"] if quick else [])
    proc = subprocess.run(args, capture_output=True, text=True, env=env)
    last = (proc.stderr.strip().splitlines() or ["no message"])[-1][:160]
    if proc.returncode != 0 or not proc.stdout.strip():
        raise UserError(f"MLX did not run with LD_PRELOAD={preload} ({last}); is it an OpenBLAS for this machine?")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if preload and os.path.realpath(preload) not in {os.path.realpath(p) for p in result["blas_paths"]}:
        raise UserError(f"MLX did not run with LD_PRELOAD={preload}: the loader ignored it ({last}); is it an OpenBLAS for this machine?")
    return result


def machine_info() -> dict:
    """What a benchmark table needs to say about where it ran."""
    return {
        "cpu": cpu_model(), "cores": os.cpu_count(), "platform": f"{platform.system()} {platform.machine()}",
        "python": platform.python_version(), "mlx": version("mlx"), "mlx_backend_package": version("mlx-cpu") or version("mlx-metal") or version("mlx-cuda"),
        "mlx_lm": version("mlx-lm"), "torch": version("torch"), "transformers": version("transformers"),
        "backend": backend_name(), "device": str(mx.default_device()), "blas": blas_kind(loaded_blas()),
        "preloaded": os.environ.get("LD_PRELOAD") or None,
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def report(*, openblas: bool | str = False, quick: bool = False) -> dict:
    """Everything `mlx-gpt2 doctor` prints, as a dict (the --json output)."""
    info = machine_info()
    info["dtype_default"] = {name: str(default_dtype(d)).split(".")[-1] for name, d in
                             (("float32", mx.float32), ("float16", mx.float16), ("bfloat16", mx.bfloat16))}
    info["layout_default"] = "input-major" if prefers_input_major() else "checkpoint"
    info["prefill_step_default"] = prefill_step()
    info["here"] = measure(quick)
    info["blas_choice"] = describe_choice()
    lib = openblas if isinstance(openblas, str) else find_openblas()
    info["openblas_path"] = lib
    if openblas and "OpenBLAS" in info["here"]["blas"]:  # this process has it: measure the bundled one beside it
        info["without_openblas"] = measure_in_subprocess(None, quick)
    elif openblas and lib:
        info["with_openblas"] = measure_in_subprocess(lib, quick)
    elif openblas:
        raise UserError(f"no OpenBLAS found to measure; {HOW_TO_GET_ONE.split(' makes')[0]}, or set MLX_GPT2_OPENBLAS=/path")
    return info


if __name__ == "__main__":
    print(json.dumps(measure("--quick" in sys.argv)))
