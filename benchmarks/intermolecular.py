"""Intermolecular forces on the dimer test set: the part of the force error that long range is about.

On an isolated dimer the forces on the atoms of monomer A add up to the force that B exerts on A
(the intramolecular forces cancel in the sum). Its error, per Cartesian component, isolates the
intermolecular interaction, which beyond the 5 Å cutoff only a long-range model can see; the per-atom
force MAE of the other studies is dominated by the intramolecular forces, which are local.

Sources (the same test split as long_range.py / accuracy.py):

* ``--accuracy benchmarks/results/accuracy.json``: the per-atom test predictions stored by
  accuracy.py for every model (cartlorem none / lorem / multipole and MACE);
* ``--models benchmarks/results/long_range_models``: the dimers_*.pt models saved by long_range.py (not committed: run long_range.py first to score them too),
  evaluated here.

    python benchmarks/intermolecular.py     # writes benchmarks/results/intermolecular.{md,json}
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project: cartlorem and benchmarks

from benchmarks.harness import add_data_argument, command_line, load_split, machine_info  # noqa: E402

BINS = [(0.0, 5.0, "sep<5"), (5.0, 8.0, "5<=sep<8"), (8.0, np.inf, "sep>=8")]


def monomer_net_forces(frames, forces) -> np.ndarray:
    """Net force on each monomer per frame, [M, 2 (A, B), 3] (eV/Å): A is the first
    ``info["monomer_a_atoms"]`` atoms of a frame, B the rest; forces [N, 3] listed frame after frame."""
    out, start = np.zeros((len(frames), 2, 3)), 0
    for k, a in enumerate(frames):
        n, na = len(a), int(a.info["monomer_a_atoms"])
        out[k, 0] = forces[start:start + na].sum(0)
        out[k, 1] = forces[start + na:start + n].sum(0)
        start += n
    if start != len(forces):
        raise ValueError(f"predictions cover {len(forces)} atoms, the test frames {start}")
    return out


def net_force_errors(frames, forces_pred, forces_ref):
    """Per frame: net force on monomer A, predicted and reference ([M, 3] each, eV/Å)."""
    return monomer_net_forces(frames, forces_pred)[:, 0], monomer_net_forces(frames, forces_ref)[:, 0]


#: class-resolved groups beyond 8 Å, where only long range sees the partner
CLASSES = ["charged-charged", "charged-polar", "polar-polar"]


def table_rows(frames, fp, fr) -> dict:
    sep = np.array([float(a.info["separation"]) for a in frames])
    cls = np.array([str(a.info["classes"]) for a in frames])
    err = np.abs(fp - fr) * 1000.0  # meV/Å
    masks = {name: (sep >= lo) & (sep < hi) for lo, hi, name in [(0.0, np.inf, "all")] + BINS}
    masks.update({f"{c}, sep>=8": (cls == c) & (sep >= 8.0) for c in CLASSES})
    res = {}
    for name, m in masks.items():
        if m.any():
            res[name] = {"n": int(m.sum()), "net_force_mae_mev_per_a": float(err[m].mean()),
                         "reference_mean_abs_mev_per_a": float(np.abs(fr[m]).mean() * 1000.0)}
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_argument(p)
    p.add_argument("--accuracy", default=str(HERE / "results" / "accuracy.json"))
    p.add_argument("--models", default=str(HERE / "results" / "long_range_models"))
    p.add_argument("--out", default=str(HERE / "results" / "intermolecular"))
    p.add_argument("--models-seed", type=int, default=0,
                   help="split seed the saved models were trained with (long_range.py --seed, default 0)")
    args = p.parse_args(argv)
    splits = {}

    def test_set(seed: int, test_fraction: float = 0.2):
        """Test frames and graphs of the dimer split that accuracy.py / long_range.py used with this seed."""
        key = (seed, test_fraction)
        if key not in splits:
            split_args = argparse.Namespace(data_dir=args.data_dir, max_frames=0, cutoff=5.0,
                                            test_fraction=test_fraction, seed=seed)
            frames, graphs, _, _, _, test_idx = load_split("dimers", split_args)
            splits[key] = ([frames[k] for k in test_idx], [graphs[k] for k in test_idx])
        return splits[key]

    results, seeds = {}, set()
    if Path(args.accuracy).exists():
        acc = json.loads(Path(args.accuracy).read_text())
        meta = acc.get("meta", {})
        if int(meta.get("max_frames") or 0):
            p.error(f"{args.accuracy} was run on a subset (--max-frames); its test frames are not the study's")
        # the predictions are of the test frames of the split accuracy.py made with its own seed
        seed, fraction = int(meta.get("seed", 0)), float(meta.get("test_fraction", 0.2))
        test_frames, _ = test_set(seed, fraction)
        for v, x in acc.get("results", {}).get("dimers", {}).get("variants", {}).items():
            if "parity" not in x:
                continue
            fp = np.array(x["parity"]["forces_pred"]).reshape(-1, 3)
            fr = np.array(x["parity"]["forces_ref"]).reshape(-1, 3)
            label = f"accuracy.py: {'MACE' if v == 'mace' else 'cartlorem ' + v} ({x.get('epochs')} epochs)"
            results[label] = table_rows(test_frames, *net_force_errors(test_frames, fp, fr))
            seeds.add(seed)
    if Path(args.models).is_dir():
        import cartlorem
        from cartlorem.evaluate import predict

        test_frames, test_graphs = test_set(args.models_seed)
        for v in ("none", "lorem", "multipole"):
            path = Path(args.models) / f"dimers_{v}.pt"
            if path.exists():
                model = cartlorem.load_model(path)
                pred = predict(model, test_graphs, batch_size=16)
                label = f"long_range.py: cartlorem {v} (saved model)"
                results[label] = table_rows(test_frames, *net_force_errors(test_frames, pred.forces_pred,
                                                                           pred.forces_ref))
                seeds.add(args.models_seed)
    if not results:
        p.error("nothing to score: neither --accuracy nor --models has dimer results")
    groups = list(next(iter(results.values())))
    meta = {**machine_info(), "command": command_line("intermolecular.py", argv), "accuracy": args.accuracy,
            "models": args.models, "models_seed": args.models_seed, "seeds": sorted(seeds), "data_dir": args.data_dir}
    lines = ["# Intermolecular force on the dimer test set", "",
             "MAE of the net force on monomer A (sum over its atoms = the force B exerts on A), per Cartesian "
             "component, meV/Å; in brackets the mean |reference| of that component (the signal). Test split of "
             f"long_range.py / accuracy.py, seed {', '.join(map(str, sorted(seeds)))} (395 dimers). "
             f"`{meta['command']}` ({meta['date']}, commit {(meta.get('git_commit') or '?')[:10]}"
             f"{', dirty tree' if meta.get('git_dirty') else ''}, {meta['cpu_model']}, load {meta['loadavg_1min']}).",
             "",
             "| model | " + " | ".join(f"{g} (n={next(iter(results.values()))[g]['n']})" for g in groups) + " |",
             "|---|" + "---|" * len(groups)]
    for label, r in results.items():
        lines.append(f"| {label} | " + " | ".join(
            f"{r[g]['net_force_mae_mev_per_a']:.1f} ({r[g]['reference_mean_abs_mev_per_a']:.0f})" for g in groups) + " |")
    Path(args.out + ".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
