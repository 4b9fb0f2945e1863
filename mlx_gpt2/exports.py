"""Lazy public names for a package: each is imported from its module on first use.

`install(__name__, {"name": "submodule", ...})` gives the package `__getattr__`, `__dir__` and `__all__`,
so `import mlx_gpt2` (and the command line) start without importing MLX until a name is used. Exported
names win over submodules of the same name: `mlx_gpt2.perplexity` stays the function, as
`from mlx_gpt2 import perplexity` promises, even after the module `mlx_gpt2.perplexity` was imported.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any


class _Package(types.ModuleType):
    _exports: dict[str, str] = {}

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._exports and isinstance(value, types.ModuleType):
            return  # the import system binding the submodule: it stays in sys.modules only
        super().__setattr__(name, value)


def install(package: str, exports: dict[str, str]) -> None:
    module = sys.modules[package]

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{exports[name]}", package), name)
        setattr(module, name, value)  # the next lookup is a plain attribute
        return value

    def __dir__() -> list[str]:
        return sorted([*vars(module), *exports])

    module.__getattr__, module.__dir__, module.__all__ = __getattr__, __dir__, sorted(exports)
    module.__class__ = type(f"{package}.Package", (_Package,), {"_exports": exports})
