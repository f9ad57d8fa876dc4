"""Does training on the molecular dipole help? (issue 14 item 2)

Trains the "multipole" model on the dimer set twice, same seed, split, epochs and wall cap:

* ``ef``: energy + forces (the dipole labels are read, so validation reports the dipole error, but
  their loss weight is 0);
* ``ef_dipole``: energy + forces + the xTB dipole (``atoms.info["xtb_dipole"]``, e·Å, about the
  coordinate origin, as the model's P = Σ_i q_i r_i + μ_i of channel 0).

and reports on the test split: dipole MAE (e·Å), energy (meV/atom) and force (meV/Å) MAEs, and the
charge of every charged monomer (sum of its channel-0 charges) against its formal ±1, scored by the
functions of ``benchmarks/charge_units.py`` (same split as that study and ``long_range.py``).

    PYTHONPATH=$PWD python3 benchmarks/dipole_study.py --data-dir ../shared/data --epochs 4 --budget 900 --threads 1
    PYTHONPATH=$PWD python3 benchmarks/dipole_study.py --quick        # smoke test: 1 epoch, 200 frames

Writes benchmarks/results/dipole_study.json and .md (command, date, commit, machine load stamped).
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
from benchmarks.charge_units import DEFAULT_DATA, monomer_table, predict_charges, score, stamp  # noqa: E402
from cartlorem.data import read_dataset, split  # noqa: E402
from cartlorem.evaluate import evaluate  # noqa: E402
from cartlorem.train import train  # noqa: E402
from benchmarks.harness import add_study_arguments, command_line, study_variants, write_json_md  # noqa: E402

VARIANTS = ("ef", "ef_dipole")
ROWS = [("dipole MAE (e·Å)", "dipole_mae_e_a"), ("dipole RMSE (e·Å)", "dipole_rmse_e_a"),
        ("energy MAE (meV/atom)", "energy_mae_mev_per_atom"), ("force MAE (meV/Å)", "forces_mae_mev_per_a"),
        ("charged monomers: MAE of Q vs formal ±1 (e)", "charged_mae_vs_formal_e"),
        ("… at separation ≥ 8 Å", "charged_far_mae_vs_formal_e"),
        ("charged: MAE vs xTB monomer charge (e)", "charged_mae_vs_xtb_e"),
        ("neutral monomers: mean |Q| (e)", "neutral_mae_vs_formal_e"),
        ("epochs", "epochs"), ("training wall time (s)", "train_seconds")]


def to_markdown(res) -> str:
    m = res["meta"]
    lines = [f"# Training on the molecular dipole ({m['date']}, commit {m['git_commit'][:10]})", "",
             f"`multipole` on dimers.xyz: train {res['n_train']}, valid {res['n_valid']}, test {res['n_test']} frames "
             f"(split of long_range.py / charge_units.py); {m['epochs']} epochs asked (wall cap {m['budget_s']} s per "
             f"model), channels {m['channels']}, seed {m['seed']}, {m['dtype']}, loss weights energy {m['energy_weight']}, "
             f"forces {m['forces_weight']}, dipole {m['dipole_weight']} (`ef_dipole` only; label `xtb_dipole`, e·Å). "
             f"Load {m['loadavg_1min']:.1f} on {m['cpu_count']} CPUs at the start (shared machine, torch threads "
             f"{m['torch_num_threads']}). Test-split numbers; monomer charge = sum of channel-0 charges over its atoms.",
             "", f"Command: `{m['command']}`", "", "| | E+F | E+F+dipole |", "|---|---|---|"]
    for label, key in ROWS:
        cells = []
        for v in VARIANTS:
            x = res["variants"].get(v, {}).get(key)
            cells.append("–" if x is None else (f"{x:.3f}" if isinstance(x, float) else str(x)))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    ev = res["variants"]
    if all(v in ev for v in VARIANTS):
        a, b = ev["ef"], ev["ef_dipole"]
        change = lambda k: 100.0 * (b[k] - a[k]) / a[k]
        lines += ["", f"With the dipole term: dipole MAE {change('dipole_mae_e_a'):+.0f} %, energy MAE "
                  f"{change('energy_mae_mev_per_atom'):+.0f} %, force MAE {change('forces_mae_mev_per_a'):+.0f} %, "
                  f"charged-monomer error {change('charged_mae_vs_formal_e'):+.0f} % (negative: better)."]
        if a["epochs"] != b["epochs"]:
            lines.append(f"Note: the wall cap stopped the runs at different epochs ({a['epochs']} vs {b['epochs']}).")
    lines += ["", f"Reference: mean |P| of the test labels {res['mean_abs_dipole_label_e_a']:.3f} e·Å (per component)."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(DEFAULT_DATA), help="folder with dimers.xyz (default ../shared/data)")
    p.add_argument("--forces-weight", type=float, default=1.0)
    p.add_argument("--dipole-weight", type=float, default=1.0)
    p.add_argument("--max-frames", type=int, default=0, help="first N frames only (0: all)")
    add_study_arguments(p, variants=VARIANTS, out=str(HERE / "results" / "dipole_study"), epochs=4, budget=900.0,
                        quick_help="smoke test: 1 epoch on 200 frames, results not written")
    args = p.parse_args(argv)
    variants = study_variants(p, args, VARIANTS)
    path = Path(args.data_dir) / "dimers.xyz"
    if not path.is_file():
        p.error(f"{path} not found: pass --data-dir, the folder that holds dimers.xyz")
    if args.quick:
        args.epochs, args.max_frames = 1, 200
    command = command_line("dipole_study.py", argv)

    from ase.io import read

    frames = read(path, ":")
    if args.max_frames:
        frames = frames[: args.max_frames]
    dtype = getattr(torch, args.dtype)
    graphs = read_dataset(frames, args.cutoff, require=("energy", "forces"), dtype=dtype, dipole_key="xtb_dipole")
    species = sorted({int(z) for a in frames for z in a.numbers})
    rest, test_idx = split(len(graphs), valid_fraction=0.2, seed=args.seed)
    tr, va = split(len(rest), valid_fraction=0.1, seed=args.seed + 1)
    train_idx, valid_idx = rest[tr], rest[va]
    test_frames = [frames[k] for k in test_idx]
    test_graphs = [graphs[k] for k in test_idx]
    monomers = monomer_table(test_frames)

    res = {"meta": {**stamp(), "command": command, "epochs": args.epochs, "budget_s": args.budget,
                    "channels": args.channels, "cutoff": args.cutoff, "seed": args.seed, "dtype": args.dtype,
                    "energy_weight": args.energy_weight, "forces_weight": args.forces_weight,
                    "dipole_weight": args.dipole_weight},
           "n_train": len(train_idx), "n_valid": len(valid_idx), "n_test": len(test_idx),
           "mean_abs_dipole_label_e_a": float(torch.cat([g.dipole for g in test_graphs]).abs().mean()),
           "variants": {}}
    for variant in variants:
        torch.manual_seed(args.seed)
        model = cartlorem.CartLorem(species, cutoff=args.cutoff, long_range="multipole", channels=args.channels,
                                    num_layers=2, correlation=2).to(dtype)
        weights = {"energy": args.energy_weight, "forces": args.forces_weight,
                   "dipole": args.dipole_weight if variant == "ef_dipole" else 0.0}
        t0 = time.perf_counter()
        result = train(model, [graphs[k] for k in train_idx], [graphs[k] for k in valid_idx], epochs=args.epochs,
                       batch_size=args.batch_size, lr=args.lr, max_time=args.budget, patience=None, seed=args.seed,
                       progress=False, weights=weights)
        wall = time.perf_counter() - t0
        model.eval()
        m = evaluate(model, test_graphs)
        charges, _, _ = predict_charges(model, test_graphs)
        per_frame = np.split(charges, np.cumsum([len(a) for a in test_frames])[:-1])
        out = score(monomers, per_frame, 1.0)  # coupling of channel 0 is fixed at 1
        out.update({k: m.get(k) for k in ("dipole_mae_e_a", "dipole_rmse_e_a", "energy_mae_mev_per_atom",
                                          "forces_mae_mev_per_a")})
        out.update(weights=weights, epochs=int(result.epochs_completed), stop_reason=result.stop_reason,
                   train_seconds=round(wall, 1), history=result.history)
        res["variants"][variant] = out
        print(f"{variant:10s} dipole MAE {out['dipole_mae_e_a']:.4f} e*A, E {out['energy_mae_mev_per_atom']:.2f} "
              f"meV/atom, F {out['forces_mae_mev_per_a']:.1f} meV/A, charged MAE vs formal "
              f"{out['charged_mae_vs_formal_e']:.3f} e, {out['epochs']} epochs, {wall:.0f} s", flush=True)
    md = to_markdown(res)
    print(md)
    if not args.quick:
        write_json_md(args.out, res, md)


if __name__ == "__main__":
    main()
