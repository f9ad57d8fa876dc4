"""Example data shipped with cartlorem.

``demo_path()`` is the extxyz file that ``cartlorem demo`` trains on: 500 small Na/Cl/water
clusters labelled with GFN2-xTB (see ``README.md`` here and ``generate_demo.py``, which rebuilds it).
"""

from pathlib import Path

__all__ = ["demo_path"]


def demo_path() -> Path:
    """Path of the bundled demo dataset ``demo.xyz`` (extxyz, energies in eV, forces in eV/Å)."""
    path = Path(__file__).resolve().parent / "demo.xyz"
    if not path.is_file():
        raise FileNotFoundError(
            f"the demo dataset is missing from this installation ({path}); rebuild it with "
            f"`python -m cartlorem.datasets.generate_demo {path}` (needs the data extra: "
            "pip install 'cartlorem[data]', i.e. tblite)"
        )
    return path


def require_tblite(parser) -> None:
    """The labelling scripts' check, before any work: without tblite (GFN2-xTB) ``parser`` exits with a one-line
    message naming the install, not a ModuleNotFoundError traceback."""
    import importlib

    try:
        importlib.import_module("tblite.ase")
    except ImportError as err:
        parser.error(f"labelling with GFN2-xTB needs tblite, the data extra ({err}): pip install 'cartlorem[data]' "
                     "(or pip install tblite)")
