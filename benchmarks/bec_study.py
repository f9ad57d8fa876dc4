"""Training on Born effective charges (issue 14 item 2).

Trains the "multipole" model on the bundled Born-charge set (``cartlorem/datasets/bec_water.xyz``:
(H2O)2-4, Na⁺(H2O)2, Cl⁻(H2O)2 at GFN2-xTB, Z* by finite differences of the xTB dipole; see
``cartlorem/datasets/README.md``) twice, with the same seed, split and epochs:

* ``ef``: energy + forces (Born charges and dipoles are read, so they are scored, but not trained);
* ``ef_bec``: energy + forces + Born effective charges (MSE over the 9 components of every atom).

Reports on the test split: Born-charge MAE (e; all atoms and per element), dipole MAE (e·Å), energy
(meV/atom) and force (meV/Å) MAEs, and two baselines for the Born charges: Z* = 0 and the per-element
mean Z* tensor of the training split.

    PYTHONPATH=$PWD python3 benchmarks/bec_study.py --epochs 40 --threads 1
    PYTHONPATH=$PWD python3 benchmarks/bec_study.py --quick      # smoke test: 2 epochs

Writes benchmarks/results/bec_study.json and .md (command, date, commit, machine load stamped).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import cartlorem  # noqa: E402
from benchmarks.charge_units import stamp  # noqa: E402
from cartlorem.data import read_dataset, split  # noqa: E402
from cartlorem.evaluate import metrics, predict  # noqa: E402
from cartlorem.train import train  # noqa: E402
from benchmarks.harness import add_study_arguments, command_line, study_variants, write_json_md  # noqa: E402

DATA = HERE.parent / "cartlorem" / "datasets" / "bec_water.xyz"
VARIANTS = ("ef", "ef_bec")
SYMBOLS = {1: "H", 8: "O", 11: "Na", 17: "Cl"}


def per_element_mae(p, mask=None) -> dict:
    """Born-charge MAE (e) per element over atoms with labels and predictions."""
    done = p.has_born_charges & np.isfinite(p.born_charges_pred).all(axis=(1, 2))
    err = np.abs(p.born_charges_pred - p.born_charges_ref)
    return {SYMBOLS.get(int(z), str(z)): float(err[done & (p.species == z)].mean()) for z in np.unique(p.species)
            if (done & (p.species == z)).any()}


def baselines(train_graphs, test_graphs) -> dict:
    """MAE (e) of Z* = 0 and of the per-element mean Z* tensor of the training split, on the test split."""
    zs = torch.cat([g.born_charges for g in train_graphs]).double()
    sp = torch.cat([g.species for g in train_graphs])
    mean = {int(z): zs[sp == z].mean(0) for z in sp.unique()}
    ref = torch.cat([g.born_charges for g in test_graphs]).double()
    species = torch.cat([g.species for g in test_graphs])
    guess = torch.stack([mean[int(z)] for z in species])
    return {"zero_mae_e": float(ref.abs().mean()), "species_mean_mae_e": float((guess - ref).abs().mean())}


def to_markdown(res) -> str:
    m = res["meta"]
    lines = [f"# Training on Born effective charges ({m['date']}, commit {m['git_commit'][:10]})", "",
             f"`multipole` on cartlorem/datasets/bec_water.xyz (GFN2-xTB water / ion–water clusters): train "
             f"{res['n_train']}, valid {res['n_valid']}, test {res['n_test']} frames; {m['epochs']} epochs, channels "
             f"{m['channels']}, seed {m['seed']}, {m['dtype']}, loss weights energy {m['energy_weight']}, forces "
             f"{m['forces_weight']}, Born charges {m['bec_weight']} (`ef_bec` only). Load {m['loadavg_1min']:.1f} on "
             f"{m['cpu_count']} CPUs at the start (shared machine, torch threads {m['torch_num_threads']}). "
             "Test-split numbers.", "", f"Command: `{m['command']}`", "", "| | E+F | E+F+BEC |", "|---|---|---|"]
    rows = [("Born-charge MAE (e)", "born_charges_mae_e"), ("Born-charge RMSE (e)", "born_charges_rmse_e")]
    rows += [(f"… {el} atoms (e)", f"bec_mae_{el}") for el in ("O", "H", "Na", "Cl")]
    rows += [("dipole MAE (e·Å)", "dipole_mae_e_a"), ("energy MAE (meV/atom)", "energy_mae_mev_per_atom"),
             ("force MAE (meV/Å)", "forces_mae_mev_per_a"), ("epochs", "epochs"),
             ("training wall time (s)", "train_seconds")]
    for label, key in rows:
        cells = []
        for v in VARIANTS:
            x = res["variants"].get(v, {}).get(key)
            cells.append("–" if x is None else (f"{x:.3f}" if isinstance(x, float) else str(x)))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    b = res["baselines"]
    lines += ["", f"Baselines for the Born charges on the same test split: Z* = 0 gives {b['zero_mae_e']:.3f} e; the "
              f"per-element mean Z* tensor of the training split gives {b['species_mean_mae_e']:.3f} e. Labels: "
              f"acoustic sum rule |Σ_i Z*_i − Q I| ≤ {res['label_asr_max_e']:.1e} e over the set."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DATA), help="extxyz with born_charges labels (default: the bundled set)")
    p.add_argument("--forces-weight", type=float, default=1.0)
    p.add_argument("--bec-weight", type=float, default=1.0)
    add_study_arguments(p, variants=VARIANTS, out=str(HERE / "results" / "bec_study"), epochs=40,
                        quick_help="smoke test: 2 epochs, results not written")
    args = p.parse_args(argv)
    variants = study_variants(p, args, VARIANTS)
    if args.quick:
        args.epochs = 2
    command = command_line("bec_study.py", argv)

    dtype = getattr(torch, args.dtype)
    graphs = read_dataset(args.data, args.cutoff, require=("energy", "forces"), dtype=dtype)
    if not all(bool(g.has_born_charges[0]) for g in graphs):
        p.error(f"{args.data}: every frame needs atoms.arrays['born_charges']")
    species = sorted({int(z) for g in graphs for z in g.species.tolist()})
    rest, test_idx = split(len(graphs), valid_fraction=0.2, seed=args.seed)
    tr, va = split(len(rest), valid_fraction=0.1, seed=args.seed + 1)
    train_g, valid_g = [graphs[k] for k in rest[tr]], [graphs[k] for k in rest[va]]
    test_g = [graphs[k] for k in test_idx]
    asr = max(float((g.born_charges.double().sum(0) - g.total_charge.double()[0] * torch.eye(3, dtype=torch.float64))
                    .abs().max()) for g in graphs)

    res = {"meta": {**stamp(), "command": command, "epochs": args.epochs, "budget_s": args.budget,
                    "channels": args.channels, "cutoff": args.cutoff, "seed": args.seed, "dtype": args.dtype,
                    "energy_weight": args.energy_weight, "forces_weight": args.forces_weight,
                    "bec_weight": args.bec_weight, "data": str(args.data)},
           "n_train": len(train_g), "n_valid": len(valid_g), "n_test": len(test_g), "label_asr_max_e": asr,
           "baselines": baselines(train_g, test_g), "variants": {}}
    for variant in variants:
        torch.manual_seed(args.seed)
        model = cartlorem.CartLorem(species, cutoff=args.cutoff, long_range="multipole", channels=args.channels,
                                    num_layers=2, correlation=2).to(dtype)
        weights = {"energy": args.energy_weight, "forces": args.forces_weight,
                   "born_charges": args.bec_weight if variant == "ef_bec" else 0.0}
        t0 = time.perf_counter()
        result = train(model, train_g, valid_g, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                       max_time=args.budget, patience=None, seed=args.seed, progress=False, weights=weights)
        wall = time.perf_counter() - t0
        pred = predict(model, test_g)
        m = metrics(pred)
        out = {k: m.get(k) for k in ("born_charges_mae_e", "born_charges_rmse_e", "dipole_mae_e_a",
                                     "energy_mae_mev_per_atom", "forces_mae_mev_per_a")}
        out.update({f"bec_mae_{el}": v for el, v in per_element_mae(pred).items()})
        out.update(weights=weights, epochs=int(result.epochs_completed), stop_reason=result.stop_reason,
                   train_seconds=round(wall, 1), history=result.history)
        res["variants"][variant] = out
        print(f"{variant:7s} BEC MAE {out['born_charges_mae_e']:.4f} e, dipole {out['dipole_mae_e_a']:.4f} e*A, "
              f"E {out['energy_mae_mev_per_atom']:.2f} meV/atom, F {out['forces_mae_mev_per_a']:.1f} meV/A, "
              f"{out['epochs']} epochs, {wall:.0f} s", flush=True)
    md = to_markdown(res)
    print(md)
    if not args.quick:
        write_json_md(args.out, res, md)


if __name__ == "__main__":
    main()
