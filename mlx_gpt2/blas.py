"""Which BLAS multiplies matrices on MLX's CPU backend: chosen before MLX is imported.

On Linux, MLX's CPU wheel (`mlx-cpu`) bundles netlib's reference BLAS, which multiplies float32 matrices
at a few GFLOP/s. Preloading an OpenBLAS (`LD_PRELOAD`) makes MLX's own `cblas_sgemm` calls resolve to it
instead: the same MLX and the same results, tens of times faster for prompts, perplexity and training
(decoding one token at a time gains little). `prefer_openblas` does this for the command line, by itself:

1. it finds an OpenBLAS: `$MLX_GPT2_OPENBLAS` (a path), the system's (`apt-get install libopenblas0-pthread`),
   or the one `pip install 'mlx-gpt2[openblas]'` brings (cmeel-openblas);
2. once per library (and MLX version), it checks in a subprocess that MLX's matmul with it agrees with
   numpy in float64 to 1e-5, and remembers the verdict in the cache folder;
3. it re-executes the command with the library preloaded. `MLX_GPT2_OPENBLAS=0` turns all of it off.

Where no OpenBLAS is found it says once how to get one. Nothing here imports MLX, and nothing here may
end a command: any failure leaves the bundled BLAS in place.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import platform
import site
import subprocess
import sys
from pathlib import Path

OPT_OUT = {"0", "off", "no", "none", "false"}
CHOSEN = "MLX_GPT2_BLAS_CHOSEN"  # set in the re-executed command: the library it preloaded
# Where Debian/Ubuntu/Fedora put OpenBLAS.
SYSTEM_OPENBLAS = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
)
HOW_TO_GET_ONE = ("`pip install 'mlx-gpt2[openblas]'` or `apt-get install libopenblas0-pthread` makes prompts, "
                  "perplexity and training many times faster (MLX_GPT2_OPENBLAS=0 silences this)")  # fmt: skip
# Run with the library preloaded: MLX's float32 matmul against numpy in float64, and whether the library was used.
_CHECK = """
import json, numpy as np, mlx.core as mx
rng = np.random.default_rng(0)
a, b = rng.standard_normal((384, 384)).astype(np.float32), rng.standard_normal((384, 384)).astype(np.float32)
ours, ref = np.array(mx.array(a) @ mx.array(b)), a.astype(np.float64) @ b.astype(np.float64)
maps = open("/proc/self/maps").read()
print(json.dumps({"error": float(np.abs(ours - ref).max() / np.abs(ref).max()), "mapped": %r in maps}))
"""


def opted_out() -> bool:
    return os.environ.get("MLX_GPT2_OPENBLAS", "").strip().lower() in OPT_OUT


def cache_dir() -> Path:
    """$MLX_GPT2_CACHE_DIR, else $XDG_CACHE_HOME/mlx-gpt2, else ~/.cache/mlx-gpt2."""
    if os.environ.get("MLX_GPT2_CACHE_DIR"):
        return Path(os.environ["MLX_GPT2_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "mlx-gpt2"


def bundled_reference_blas() -> bool:
    """Whether MLX runs on its CPU wheel, whose matmuls use the reference BLAS it bundles (Linux)."""
    if platform.system() != "Linux" or _installed("mlx-cuda"):
        return False
    spec = importlib.util.find_spec("mlx")
    roots = [Path(p).parent for p in (spec.submodule_search_locations or [])] if spec else []
    return any(any((root / "mlx_cpu.libs").glob("libblas*")) for root in roots)


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def find_openblas() -> str | None:
    """$MLX_GPT2_OPENBLAS if it names a library, else the system's OpenBLAS, else cmeel-openblas's (pip)."""
    given = os.environ.get("MLX_GPT2_OPENBLAS", "").strip()
    if given and given.lower() not in OPT_OUT:
        return given
    if platform.system() != "Linux":
        return None
    pip = [str(Path(d) / "cmeel.prefix" / "lib" / "libopenblas.so.0") for d in _site_dirs()]
    return next((p for p in (*SYSTEM_OPENBLAS, *pip) if Path(p).is_file()), None)


def _site_dirs() -> list[str]:
    dirs = [*site.getsitepackages(), site.getusersitepackages()] if hasattr(site, "getsitepackages") else []
    return [*dict.fromkeys([*sys.path, *dirs])]


def _read_state() -> dict:
    try:
        state = json.loads((cache_dir() / "blas.json").read_text())
        return state if isinstance(state, dict) else {}
    except (OSError, ValueError, RecursionError):
        return {}


def _write_state(state: dict) -> None:
    try:
        from .fileio import write_json_atomic

        cache_dir().mkdir(parents=True, exist_ok=True)
        write_json_atomic(cache_dir() / "blas.json", state)
    except OSError:
        pass  # a read-only home: the check runs again next time, nothing worse


def check_openblas(lib: str) -> dict:
    """The verdict on `lib`: MLX's matmul error with it preloaded, whether it was used, and `ok`.

    Run once per library file and MLX version; the verdict is remembered in the cache folder.
    """
    stat = os.stat(lib)
    key = f"{os.path.realpath(lib)}|{stat.st_size}|{stat.st_mtime_ns}|mlx {_mlx_version()}"
    state = _read_state()
    verdicts = state.setdefault("verdicts", {})
    if key not in verdicts:
        env = {**os.environ, "LD_PRELOAD": lib}
        env.pop(CHOSEN, None)
        try:
            proc = subprocess.run([sys.executable, "-c", _CHECK % os.path.realpath(lib)], capture_output=True,
                                  text=True, env=env, timeout=300)  # fmt: skip
            result = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {}
        except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
            result = {}
        ok = bool(result.get("mapped")) and isinstance(result.get("error"), float) and result["error"] < 1e-5
        verdicts[key] = {"ok": ok, **result}
        _write_state(state)
    return verdicts[key]


def _mlx_version() -> str:
    try:
        return importlib.metadata.version("mlx")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def prefer_openblas(argv: list[str]) -> None:
    """Re-execute `mlx-gpt2 ARGV` with a checked OpenBLAS preloaded, where MLX would use its reference BLAS.

    Returns (and the command runs as it is) when there is nothing to do or anything fails.
    """
    try:
        preloaded = os.environ.get("LD_PRELOAD", "")
        if opted_out() or CHOSEN in os.environ or "openblas" in preloaded.lower() or not bundled_reference_blas():
            return
        lib = find_openblas()
        if lib is None:
            _tell_once()
            return
        if not Path(lib).is_file() or not check_openblas(lib)["ok"]:
            return
        env = {**os.environ, "LD_PRELOAD": " ".join(filter(None, [lib, preloaded])), CHOSEN: lib}
        os.execve(sys.executable, [sys.executable, "-m", "mlx_gpt2", *argv], env)
    except Exception:  # never a traceback, never a failed command because of this
        return


def _tell_once() -> None:
    state = _read_state()
    if not state.get("told"):
        print(f"note: MLX's CPU wheel multiplies matrices with a slow reference BLAS; {HOW_TO_GET_ONE}", file=sys.stderr)
        _write_state({**state, "told": True})


def describe_choice() -> str:
    """One line on the BLAS this process uses (printed by `--verbose`)."""
    chosen, preloaded = os.environ.get(CHOSEN), os.environ.get("LD_PRELOAD", "")
    if chosen:
        return f"OpenBLAS {chosen} (preloaded by mlx-gpt2; MLX_GPT2_OPENBLAS=0 turns it off)"
    if "openblas" in preloaded.lower():
        return f"OpenBLAS (LD_PRELOAD={preloaded})"
    if not bundled_reference_blas():
        return "the backend's own (Accelerate on macOS, or the GPU's)"
    if opted_out():
        return "MLX's bundled reference BLAS (MLX_GPT2_OPENBLAS=0)"
    lib = find_openblas()
    if lib is None:
        return f"MLX's bundled reference BLAS (no OpenBLAS found: {HOW_TO_GET_ONE.split(' makes')[0]})"
    if any(v.get("ok") and k.startswith(os.path.realpath(lib) + "|") for k, v in _read_state().get("verdicts", {}).items()):
        return f"MLX's bundled reference BLAS (the `mlx-gpt2` command preloads {lib}; this process did not)"
    return f"MLX's bundled reference BLAS ({lib} was not preloaded; `mlx-gpt2 doctor --openblas` measures it)"
