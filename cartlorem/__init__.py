"""cartlorem: interatomic potentials on irreducible Cartesian tensors with long-range equivariant messages.

Public API (docs/DESIGN.md): ``tensors``, ``ewald``, ``CartLorem``, ``CartLoremCalculator``,
``save_model``, ``load_model``. Submodules are imported on first use so that ``import cartlorem``
stays light.
"""

import importlib

__version__ = "0.1.0"

_LAZY = {
    "CartLorem": ("cartlorem.model", "CartLorem"),
    "save_model": ("cartlorem.model", "save_model"),
    "load_model": ("cartlorem.model", "load_model"),
    "CartLoremCalculator": ("cartlorem.calculator", "CartLoremCalculator"),
}
_SUBMODULES = {
    "tensors", "ewald", "units", "graph", "data", "testing", "nn", "model", "forces", "train", "training",
    "config", "calculator", "evaluate", "md", "demo", "fileio", "cli", "datasets", "export", "integrations",
}

__all__ = ["tensors", "ewald", "units", "CartLorem", "CartLoremCalculator", "save_model", "load_model"]


def __getattr__(name):
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        value = importlib.import_module(f"cartlorem.{name}")
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cartlorem' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
