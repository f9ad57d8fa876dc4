"""Can a model tell charge states of one geometry apart? (issue 14 item 4)

Data: the cations of ../shared/data/nacl.xyz (Na9Cl8⁺ singlet, Na8Cl8⁺ doublet) and, at exactly the same
geometries, the other charge states of benchmarks/data/charge_state/nacl_charge_states.xyz (Na8Cl8 neutral
singlet, Na8Cl8⁻ doublet, Na9Cl8 neutral doublet; GFN2-xTB, see the README there). Only the source frames of
the new set are used, so every geometry appears in two (Na9Cl8) or three (Na8Cl8) charge states. The split
is by geometry (test geometries are unseen in every charge state): 20 % test, 10 % of the rest validation.

Variants (same seed, split, epochs and wall cap):

* ``local``: short-range model (long_range=None): it sees geometry only, so it must predict one energy for
  all charge states of a geometry;
* ``local_cs``: the same with ``charge_state=True`` (FiLM conditioning on Q and the multiplicity);
* ``multipole_cs``: the long-range model with ``charge_state=True``;
* ``multipole``: the long-range model alone (it sees Q through the charge correction only).

Scores on the test geometries: energy MAE per charge state (meV/atom and eV per cluster), force MAE, and
the MAE of the charge-state gaps E(state) − E(cation) of one geometry (ionisation energies, electron
affinities), which a model that ignores the charge predicts as 0.

    PYTHONPATH=$PWD python3 benchmarks/charge_state.py --threads 1 --budget 600
    PYTHONPATH=$PWD python3 benchmarks/charge_state.py --quick      # smoke test, results not written

Writes benchmarks/results/charge_state.json and .md (command, date, commit, machine load stamped).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

import cartlorem
from cartlorem.data import read_dataset, split
from cartlorem.graph import collate
from cartlorem.train import train

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project: cartlorem and benchmarks
from benchmarks.harness import add_study_arguments, machine_info, study_variants, write_json_md  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parents[1] / "shared" / "data"
EXTRA = HERE / "data" / "charge_state" / "nacl_charge_states.xyz"
VARIANTS = {"local": (None, False), "local_cs": (None, True), "multipole_cs": ("multipole", True),
            "multipole": ("multipole", False)}
STATES = ("Na9Cl8+", "Na9Cl8", "Na8Cl8+", "Na8Cl8", "Na8Cl8-")
# gaps E(state) − E(reference state) at one geometry
GAPS = (("Na9Cl8", "Na9Cl8+"), ("Na8Cl8", "Na8Cl8+"), ("Na8Cl8-", "Na8Cl8"))


def load_frames(data_dir: Path, extra: Path, max_geometries: int = 0):
    """Frames of every charge state, each tagged with info["geometry"] (the nacl.xyz frame index)."""
    from ase.io import read

    cations = read(data_dir / "nacl.xyz", ":")
    new = read(extra, ":")
    sources = sorted({int(a.info["source_frame"]) for a in new})
    if max_geometries:
        sources = sources[:max_geometries]
    keep = set(sources)
    frames = []
    for k in sources:
        a = cations[k]  # (a copy would drop the single-point results)
        a.info["geometry"] = k
        frames.append(a)
    for a in new:
        if int(a.info["source_frame"]) in keep:
            if not np.allclose(a.positions, cations[int(a.info["source_frame"])].positions, atol=1e-6):
                raise ValueError(f"{extra}: a frame made from nacl.xyz frame {a.info['source_frame']} has other positions")
            a.info["geometry"] = int(a.info["source_frame"])
            frames.append(a)
    return frames, sources


def predict(model, graphs, batch_size=16):
    """Predicted energies [M] (eV) and per-structure force MAE [M] (eV/Å)."""
    energies, f_err = [], []
    for s in range(0, len(graphs), batch_size):
        batch = collate(graphs[s:s + batch_size])
        out = model(batch, create_graph=False)
        energies.append(out["energy"].detach().double())
        err = (out["forces"] - batch.forces).abs().detach().double().mean(dim=1)  # [N]
        f_err.append(torch.zeros(batch.num_graphs, dtype=torch.float64).index_add(0, batch.batch, err)
                     / batch.num_atoms.double())
    return torch.cat(energies).numpy(), torch.cat(f_err).numpy()


def score(frames, e_pred, f_mae):
    e_ref = np.array([a.get_potential_energy() for a in frames])
    n = np.array([len(a) for a in frames])
    state = np.array([a.info["cluster"] for a in frames])
    geometry = np.array([int(a.info["geometry"]) for a in frames])
    per_state = {}
    for s in STATES:
        m = state == s
        if m.any():
            err = np.abs(e_pred[m] - e_ref[m])
            per_state[s] = {"n": int(m.sum()), "energy_mae_mev_per_atom": float((err / n[m]).mean() * 1000),
                            "energy_mae_ev": float(err.mean()), "forces_mae_mev_per_a": float(f_mae[m].mean() * 1000)}
    lookup = {(g, s): k for k, (g, s) in enumerate(zip(geometry, state))}
    gaps = {}
    for s, ref in GAPS:
        pairs = [(lookup[(g, s)], lookup[(g, ref)]) for g in sorted(set(geometry)) if (g, s) in lookup and (g, ref) in lookup]
        if pairs:
            i, j = np.array(pairs).T
            d_ref, d_pred = e_ref[i] - e_ref[j], e_pred[i] - e_pred[j]
            gaps[f"{s} - {ref}"] = {"n": len(pairs), "reference_mean_ev": float(d_ref.mean()),
                                    "reference_std_ev": float(d_ref.std()), "mae_ev": float(np.abs(d_pred - d_ref).mean())}
    err = np.abs(e_pred - e_ref) / n
    return {"energy_mae_mev_per_atom": float(err.mean() * 1000), "forces_mae_mev_per_a": float(f_mae.mean() * 1000),
            "per_state": per_state, "gaps": gaps}


def stamp() -> dict:
    """harness.machine_info plus the cartlorem version and the command; the load is the one at the start of the run."""
    info = {**machine_info(), "cartlorem": cartlorem.__version__,
            "command": "PYTHONPATH=$PWD python3 benchmarks/charge_state.py " + " ".join(sys.argv[1:])}
    info["loadavg_1min_start"] = info.pop("loadavg_1min")
    return info


def fmt(x, digits=1):
    return "–" if x is None else f"{x:.{digits}f}"


def to_markdown(res) -> str:
    m, V = res["meta"], res["variants"]
    names = list(V)
    lines = [f"# Charge states of one geometry: NaCl clusters ({m['date']}, commit {m['git_commit'][:10]})", "",
             f"Command: `{m['command']}`", "",
             f"Train {res['n_train']} / valid {res['n_valid']} / test {res['n_test']} frames "
             f"({res['n_geometries']} geometries, split by geometry); channels {m['channels']}, 2 layers, "
             f"correlation 2, cutoff {m['cutoff']} Å, {m['dtype']}, seed {m['seed']}, up to {m['epochs']} epochs with a "
             f"wall cap of {m['budget_s']} s per model, {m['torch_num_threads']} thread; machine load "
             f"{m['loadavg_1min_start']:.1f} → {m['loadavg_1min_end']:.1f} on {m['cpu_count']} CPUs (shared, so "
             "the wall times are pessimistic).", "",
             "Energy MAE on the test geometries, per charge state (meV/atom; eV per cluster in brackets):", "",
             "| charge state (Q, multiplicity) | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    qs = {"Na9Cl8+": "+1, 1", "Na9Cl8": "0, 2", "Na8Cl8+": "+1, 2", "Na8Cl8": "0, 1", "Na8Cl8-": "−1, 2"}
    for s in STATES:
        cells = []
        for v in names:
            p = V[v]["per_state"].get(s)
            cells.append("–" if p is None else f"{p['energy_mae_mev_per_atom']:.1f} ({p['energy_mae_ev']:.2f})")
        lines.append(f"| {s} ({qs[s]}) | " + " | ".join(cells) + " |")
    lines.append("| all: energy (meV/atom) | " + " | ".join(fmt(V[v]["energy_mae_mev_per_atom"]) for v in names) + " |")
    lines.append("| all: forces (meV/Å) | " + " | ".join(fmt(V[v]["forces_mae_mev_per_a"]) for v in names) + " |")
    lines.append("| epochs / training s | " + " | ".join(f"{V[v]['epochs']} / {V[v]['train_seconds']:.0f}"
                                                      for v in names) + " |")
    lines += ["", "Charge-state gaps at one geometry, E(state) − E(other state) (eV): reference mean ± spread, "
              "and the MAE of each model's gap (a model blind to the charge predicts 0):", "",
              "| gap | reference (eV) | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    first = V[names[0]]["gaps"]
    for key, g in first.items():
        lines.append(f"| {key} | {g['reference_mean_ev']:.2f} ± {g['reference_std_ev']:.2f} | "
                     + " | ".join(fmt(V[v]["gaps"].get(key, {}).get("mae_ev"), 3) for v in names) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(DEFAULT_DATA), help="folder with nacl.xyz (default ../shared/data)")
    p.add_argument("--extra", default=str(EXTRA), help="the other charge states (default: the shipped set)")
    p.add_argument("--max-geometries", type=int, default=0, help="first N geometries only (0: all)")
    add_study_arguments(p, variants=VARIANTS, out=str(HERE / "results" / "charge_state"), epochs=40, budget=600.0,
                        default_variants=("local", "local_cs", "multipole_cs", "multipole"),
                        quick_help="smoke test: 1 epoch on 20 geometries, results not written")
    args = p.parse_args(argv)
    variants = study_variants(p, args, VARIANTS)
    if not (Path(args.data_dir) / "nacl.xyz").is_file():
        p.error(f"{Path(args.data_dir) / 'nacl.xyz'} not found: pass --data-dir, the folder that holds nacl.xyz")
    if args.quick:
        args.epochs, args.max_geometries, args.budget = 1, 20, 60.0

    frames, geometries = load_frames(Path(args.data_dir), Path(args.extra), args.max_geometries)
    dtype = getattr(torch, args.dtype)
    graphs = read_dataset(frames, args.cutoff, require=("energy", "forces"), dtype=dtype)
    rest, test_g = split(len(geometries), valid_fraction=0.2, seed=args.seed)
    tr, va = split(len(rest), valid_fraction=0.1, seed=args.seed + 1)
    which = {geometries[k]: name for name, idx in (("train", rest[tr]), ("valid", rest[va]), ("test", test_g))
             for k in idx}
    part = {name: [k for k, a in enumerate(frames) if which[int(a.info["geometry"])] == name]
            for name in ("train", "valid", "test")}
    test_frames = [frames[k] for k in part["test"]]

    res = {"meta": {**stamp(), "epochs": args.epochs, "budget_s": args.budget, "channels": args.channels,
                    "cutoff": args.cutoff, "seed": args.seed, "dtype": args.dtype, "lr": args.lr,
                    "batch_size": args.batch_size, "energy_weight": args.energy_weight},
           "n_geometries": len(geometries), "n_train": len(part["train"]), "n_valid": len(part["valid"]),
           "n_test": len(part["test"]), "variants": {}}
    for variant in variants:
        long_range, charge_state = VARIANTS[variant]
        torch.manual_seed(args.seed)
        model = cartlorem.CartLorem([11, 17], cutoff=args.cutoff, long_range=long_range, channels=args.channels,
                                    num_layers=2, correlation=2, charge_state=charge_state).to(dtype)
        t0 = time.perf_counter()
        result = train(model, [graphs[k] for k in part["train"]], [graphs[k] for k in part["valid"]],
                       epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, max_time=args.budget,
                       patience=None, seed=args.seed, progress=False,
                       weights={"energy": args.energy_weight, "forces": 1.0})
        wall = time.perf_counter() - t0
        model.eval()
        e_pred, f_mae = predict(model, [graphs[k] for k in part["test"]])
        out = score(test_frames, e_pred, f_mae)
        out.update(long_range=long_range, charge_state=charge_state, epochs=int(result.epochs_completed),
                   train_seconds=round(wall, 1))
        res["variants"][variant] = out
        gaps = ", ".join(f"{k}: {g['mae_ev']:.3f}" for k, g in out["gaps"].items())
        print(f"{variant:13s} E {out['energy_mae_mev_per_atom']:.1f} meV/atom, F {out['forces_mae_mev_per_a']:.0f} "
              f"meV/A, gap MAE (eV) {gaps}; {out['epochs']} epochs, {wall:.0f} s", flush=True)
        res["meta"]["loadavg_1min_end"] = os.getloadavg()[0]
        md = to_markdown(res)
        if not args.quick:  # after every variant, so that a cut run keeps what it finished
            write_json_md(args.out, res, md)
    print(md)


if __name__ == "__main__":
    main()
