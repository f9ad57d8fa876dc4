"""The worked examples in examples/ (run as scripts; these tests load them as modules)."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_dimer_scan_stops_without_trained_models(tmp_path):
    """Without the models of benchmarks/long_range.py the example printed 'missing ...' three times, wrote a plot
    of the reference points alone over the committed one and exited 0."""
    frames = []
    for k, sep in enumerate((4.0, 6.0)):
        a = Atoms("NH3HCOO", positions=np.random.default_rng(k).normal(size=(8, 3)))
        a.positions[4:] += [sep, 0.0, 0.0]
        a.info.update(pair="ammonium-formate", separation=sep, monomer_a_atoms=4)
        a.calc = SinglePointCalculator(a, energy=-1.0 * k)
        frames.append(a)
    write(tmp_path / "dimers.xyz", frames)
    out = tmp_path / "scan.png"
    with pytest.raises(SystemExit, match="no trained models in .*benchmarks/long_range.py --sets dimers"):
        load("long_range_dimer").main(["--data", str(tmp_path / "dimers.xyz"), "--models", str(tmp_path / "none"),
                                       "--out", str(out)])
    assert not out.exists()
