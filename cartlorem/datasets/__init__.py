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
            "`python -m cartlorem.datasets.generate_demo` (needs `pip install tblite`)"
        )
    return path
