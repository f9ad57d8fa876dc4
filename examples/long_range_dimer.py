"""Dimer energy against separation for the three long-range options (worked example).

Takes one ion pair from the reference dimer set (ammonium–formate by default), moves the second
monomer rigidly along the line between the centres, and evaluates the models trained by
``benchmarks/long_range.py`` (short-range, "lorem", "multipole"; saved in
benchmarks/results/long_range_models/). The short-range model cannot see the partner beyond its
5 Å cutoff, so its curve is flat there; the long-range models carry the ion–ion tail. The xTB
energies of the same pair in other orientations are shown as points.

    python benchmarks/long_range.py --sets dimers        # trains and saves the three models
    python examples/long_range_dimer.py                  # writes benchmarks/results/dimer_scan.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from ase.io import read

import cartlorem

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "dimers.xyz"))
    p.add_argument("--models", default=str(ROOT / "benchmarks" / "results" / "long_range_models"))
    p.add_argument("--pair", default="ammonium-formate")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "dimer_scan.png"))
    args = p.parse_args(argv)

    frames = [a for a in read(args.data, ":") if a.info["pair"] == args.pair]
    if not frames:
        raise SystemExit(f"no frames of pair {args.pair!r} in {args.data}")
    base = min(frames, key=lambda a: a.info["separation"])
    n_a = int(base.info["monomer_a_atoms"])
    com_a = base.positions[:n_a].mean(0)
    com_b = base.positions[n_a:].mean(0)
    axis = (com_b - com_a) / np.linalg.norm(com_b - com_a)
    seps = np.linspace(max(3.5, float(base.info["separation"])), 12.0, 40)

    curves = {}
    for variant in ("none", "lorem", "multipole"):
        path = Path(args.models) / f"dimers_{variant}.pt"
        if not path.exists():
            print(f"missing {path}: run benchmarks/long_range.py --sets dimers first")
            continue
        calc = cartlorem.CartLoremCalculator(path, dtype="float64")
        energies = []
        for d in seps:
            a = base.copy()
            a.positions[n_a:] += (d - np.linalg.norm(com_b - com_a)) * axis
            a.calc = calc
            energies.append(a.get_potential_energy())
        curves[variant] = np.array(energies)
        print(f"{variant:9s} E(12 Å) − E({seps[0]:.1f} Å) = {curves[variant][-1] - curves[variant][0]:+.3f} eV")
    if not curves:  # a plot of the reference points alone would replace the committed one
        raise SystemExit(f"no trained models in {args.models}: run `python benchmarks/long_range.py --sets dimers` "
                         "first (it saves them there), or pass --models")

    ref_sep = np.array([a.info["separation"] for a in frames])
    ref_e = np.array([a.get_potential_energy() for a in frames])
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    shift = ref_e[np.argmax(ref_sep)]
    ax.scatter(ref_sep, ref_e - shift, s=10, c="k", label="GFN2-xTB (all orientations)")
    for variant, e in curves.items():
        ax.plot(seps, e - e[-1], label=f"cartlorem, long_range={variant}")
    ax.axvline(5.0, ls=":", c="grey")
    ax.set_xlabel("centre separation (Å)")
    ax.set_ylabel("energy relative to 12 Å (eV)")
    ax.set_title(args.pair)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
