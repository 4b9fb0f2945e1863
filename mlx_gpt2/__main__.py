"""`mlx-gpt2` and `python -m mlx_gpt2`: the command line's entry point.

Nothing heavy is imported before the `try`, so a Ctrl-C at any moment (even while MLX is still being
imported) ends with one line and exit code 130, never a traceback.
"""

import sys


def main() -> None:
    try:
        from .blas import prefer_openblas

        prefer_openblas(sys.argv[1:])  # on Linux's CPU wheel: re-executes with a checked OpenBLAS, or returns
        from .cli import app

        app()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
