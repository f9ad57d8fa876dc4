"""The shared command line of the variant studies (benchmarks/harness.add_study_arguments) and their stamps."""

import argparse
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import harness  # noqa: E402


def parser():
    p = argparse.ArgumentParser()
    harness.add_study_arguments(p, variants=("a", "b", "c"), default_variants=("a", "c"), out="x", epochs=7,
                                budget=60.0)
    return p


def test_defaults_and_chosen_variants():
    p = parser()
    args = p.parse_args([])
    assert (args.epochs, args.budget, args.channels, args.energy_weight, args.out) == (7, 60.0, 16, 10.0, "x")
    assert harness.study_variants(p, args, ("a", "b", "c")) == ["a", "c"]
    args = p.parse_args(["--variants", " b, a "])
    assert harness.study_variants(p, args, ("a", "b", "c")) == ["b", "a"]


@pytest.mark.parametrize("bad", ["", "a,d", ","])
def test_unknown_or_empty_variants_are_refused_by_name(bad, capsys):
    p = parser()
    with pytest.raises(SystemExit):
        harness.study_variants(p, p.parse_args(["--variants", bad]), ("a", "b", "c"))
    assert "--variants: a comma list of a, b, c" in capsys.readouterr().err


def test_charge_state_results_carry_the_command(monkeypatch):
    """charge_state.to_markdown prints the command from the stamp; the stamp had lost it (KeyError: 'command'
    at the end of every run, --quick included)."""
    from benchmarks import charge_state

    monkeypatch.setattr(sys, "argv", ["charge_state.py", "--quick", "--epochs", "3"])
    info = charge_state.stamp()
    assert info["command"] == "PYTHONPATH=$PWD python3 benchmarks/charge_state.py --quick --epochs 3"
