"""Are the learned charges in physical units? (issue 13 item 1)

Trains the "multipole" model on the dimer set in up to three variants, with the same seed, split and
budget:

* ``current``: all four long-range channels carry charges (``charge_channels=None``, the default until
  the option came); the energy ``scale`` multiplies the learned readouts only, and the electrostatic
  energy is coupling × the Coulomb energy of the learned multipoles, in eV;
* ``scaled_es``: as ``current``, with the 0.1.0 behaviour, where the scale (force RMS of the training
  set, ~2 eV/Å here) multiplied the electrostatic energy too (emulated with a forward hook on the
  long-range block);
* ``one_charge_channel``: ``charge_channels=1`` (the default now): only channel 0 carries charges, the
  other long-range channels dipoles and quadrupoles only, so that the 1/r energy between the monomers
  belongs to channel 0 alone.

and scores, on the test split, the predicted charge of every monomer (the sum of the channel-0 charges
over its atoms) against its formal charge (acetate, formate, chloride −1; ammonium, methylammonium +1;
the others 0) and against the sum of the xTB charges stored in the data (``xtb_charges``). Target
(issue 13): MAE ≤ 0.1 e on the charged monomers. Channel 0 enters the energy as coupling a_0 × its
Coulomb energy, so the table also gives a_0 (times the scale for ``scaled_es``) and the charges
√(effective a_0) × Q that reproduce the learned channel-0 energy with coupling 1.

    PYTHONPATH=$PWD python3 benchmarks/charge_units.py --epochs 12 --budget 1800 --threads 1
    PYTHONPATH=$PWD python3 benchmarks/charge_units.py --epochs 12 --budget 1800 --threads 1 \
        --variants one_charge_channel                                # one column; the others are kept
    PYTHONPATH=$PWD python3 benchmarks/charge_units.py --quick      # smoke test: 1 epoch, 200 frames

Writes benchmarks/results/charge_units.json and .md (date, commit, machine load stamped, per column).
Columns of an earlier results file that this run does not retrain are kept, with the commit and load
they were measured with, when that file used the same settings (epochs, budget, channels, cutoff, seed,
dtype, split); ``--replace`` drops them. The data folder defaults to ../shared/data next to the project
(``--data-dir`` otherwise).
"""

from __future__ import annotations

import argparse
import json
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
FORMAL = {"acetate": -1, "formate": -1, "chloride": -1, "ammonium": 1, "methylammonium": 1, "water": 0,
          "methanol": 0, "acetamide": 0, "acetonitrile": 0, "methane": 0, "ethane": 0}
VARIANTS = ("current", "scaled_es", "one_charge_channel")
LABELS = {"current": "current (all 4 channels charged)", "scaled_es": "scaled_es (0.1.0)",
          "one_charge_channel": "charge_channels=1 (channel 0 only)"}
LONG_RANGE_OPTIONS = {"current": {"charge_channels": None}, "scaled_es": {"charge_channels": None},
                      "one_charge_channel": {"charge_channels": 1}}
# settings that must agree before the columns of an earlier results file are kept
SAME_SETTINGS = ("epochs", "budget_s", "channels", "cutoff", "seed", "dtype")


def monomer_table(frames) -> dict:
    """Per monomer of every frame: frame index, atom slice, formal charge, xTB charge sum, separation."""
    rows = {"frame": [], "start": [], "stop": [], "formal": [], "xtb": [], "separation": []}
    for k, a in enumerate(frames):
        names = str(a.info["pair"]).split("-")
        if len(names) != 2 or any(n not in FORMAL for n in names):
            raise ValueError(f"frame {k}: unknown monomer in pair={a.info['pair']!r}; known: {sorted(FORMAL)}")
        na = int(a.info["monomer_a_atoms"])
        formal = [FORMAL[n] for n in names]
        if sum(formal) != round(float(a.info.get("total_charge", 0.0))):
            raise ValueError(f"frame {k}: formal charges {formal} do not add up to total_charge "
                             f"{a.info.get('total_charge')}")
        xtb = np.asarray(a.arrays["xtb_charges"], dtype=float)
        for (lo, hi), q in zip([(0, na), (na, len(a))], formal):
            rows["frame"].append(k)
            rows["start"].append(lo)
            rows["stop"].append(hi)
            rows["formal"].append(q)
            rows["xtb"].append(float(xtb[lo:hi].sum()))
            rows["separation"].append(float(a.info["separation"]))
    return {k: np.asarray(v) for k, v in rows.items()}


def predict_charges(model, graphs, batch_size=16):
    """Per-atom channel-0 charges (e), and energy/force absolute errors, for a list of graphs."""
    charges, e_err, f_err = [], [], []
    for s in range(0, len(graphs), batch_size):
        batch = collate(graphs[s:s + batch_size])
        out = model(batch, create_graph=False)
        charges.append(out["charges"].detach().double())
        n_atoms = batch.num_atoms.to(out["energy"].dtype)
        e_err.append(((out["energy"] - batch.energy).abs() / n_atoms).detach().double())
        f_err.append((out["forces"] - batch.forces).abs().detach().double().flatten())
    return (torch.cat(charges).numpy(), float(torch.cat(e_err).mean()) * 1000.0,
            float(torch.cat(f_err).mean()) * 1000.0)


def scaled_electrostatics(model):
    """The 0.1.0 behaviour: the model's energy scale multiplies the electrostatic energy too."""
    def hook(block, inputs, out):
        return {**out, "electrostatic": out["electrostatic"] * model.scale}

    return model.long_range_block.register_forward_hook(hook)


def score(monomers, per_frame_charges, scale_factor):
    """MAE tables from the predicted per-atom charges of every test frame."""
    q = np.array([per_frame_charges[f][lo:hi].sum()
                  for f, lo, hi in zip(monomers["frame"], monomers["start"], monomers["stop"])])
    charged = monomers["formal"] != 0
    far = monomers["separation"] >= 8.0
    eff = q * np.sqrt(scale_factor) if scale_factor > 0 else np.full_like(q, np.nan)

    def mae(x, ref, mask):
        return float(np.abs(x[mask] - ref[mask]).mean()) if mask.any() else None

    return {
        "n_charged": int(charged.sum()), "n_neutral": int((~charged).sum()),
        "charged_mae_vs_formal_e": mae(q, monomers["formal"], charged),
        "charged_far_mae_vs_formal_e": mae(q, monomers["formal"], charged & far),
        "charged_mae_vs_xtb_e": mae(q, monomers["xtb"], charged),
        "neutral_mae_vs_formal_e": mae(q, monomers["formal"], ~charged),
        "mean_abs_charged_e": float(np.abs(q[charged]).mean()) if charged.any() else None,
        "effective_coupling_0": float(scale_factor),
        "effective_charged_mae_vs_formal_e": mae(eff, monomers["formal"], charged),
        "xtb_charged_mae_vs_formal_e": mae(monomers["xtb"], monomers["formal"], charged),
    }


def stamp() -> dict:
    """harness.machine_info plus the cartlorem version."""
    return {**machine_info(), "cartlorem": cartlorem.__version__}


def merge_earlier(res, path) -> list:
    """Copy into ``res`` the variants of the results file ``path`` that ``res`` lacks, when that file used
    the same settings and split; each keeps (or gets, from the file's meta) the commit, date and load it
    was measured with. Returns the names copied."""
    path = Path(path)
    if not path.is_file():
        return []
    old = json.loads(path.read_text())
    m, om = res["meta"], old.get("meta", {})
    same = all(om.get(k) == m[k] for k in SAME_SETTINGS) and all(
        old.get(k) == res[k] for k in ("n_train", "n_valid", "n_test"))
    if not same:
        print(f"{path}: other settings than this run; its columns are not kept", flush=True)
        return []
    copied = []
    for name, v in old.get("variants", {}).items():
        if name in VARIANTS and name not in res["variants"]:
            v = dict(v)
            v.setdefault("measured", {"git_commit": om.get("git_commit"), "date": om.get("date"),
                                      "loadavg_1min": om.get("loadavg_1min")})
            res["variants"][name] = v
            copied.append(name)
    res.setdefault("scale", old.get("scale"))
    return copied


def _measured(v) -> str:
    """'commit (date, load start → end)' of one column."""
    m = v.get("measured", {})
    def fmt(x):
        return f"{x:.2f}" if isinstance(x, (int, float)) else str(x)

    load = fmt(m.get("loadavg_1min")) + (f" → {fmt(m['loadavg_1min_end'])}" if "loadavg_1min_end" in m else "")
    return f"{str(m.get('git_commit'))[:10]} ({m.get('date')}, load {load})"


def to_markdown(res) -> str:
    m = res["meta"]
    shown = [v for v in VARIANTS if v in res["variants"]]
    lines = [f"# Learned charges in physical units ({m['date']}, commit {m['git_commit'][:10]})", "",
             f"`multipole` on dimers.xyz: train {res['n_train']}, valid {res['n_valid']}, test {res['n_test']} frames; "
             f"{m['epochs']} epochs (wall cap {m['budget_s']} s), channels {m['channels']}, seed {m['seed']}, "
             f"{m['dtype']}; {m['cpu_count']} CPUs (shared machine). "
             "Monomer charge = sum of channel-0 charges over its atoms (e). Target: charged MAE vs formal ≤ 0.1 e.",
             "", "Columns: " + "; ".join(f"{LABELS[v]} measured on {_measured(res['variants'][v])}" for v in shown) + ".",
             "", "| | " + " | ".join(LABELS[v] for v in shown) + " |", "|---" * (len(shown) + 1) + "|"]
    rows = [("charged monomers: MAE vs formal ±1 (e)", "charged_mae_vs_formal_e"),
            ("… at separation ≥ 8 Å", "charged_far_mae_vs_formal_e"),
            ("charged: MAE vs xTB monomer charge (e)", "charged_mae_vs_xtb_e"),
            ("neutral monomers: mean |Q| (e)", "neutral_mae_vs_formal_e"),
            ("charged: mean |Q| (e)", "mean_abs_charged_e"),
            ("effective coupling of channel 0 (a_0, × scale for 0.1.0)", "effective_coupling_0"),
            ("charged: MAE of √(eff. coupling)·Q vs formal (e)", "effective_charged_mae_vs_formal_e"),
            ("energy MAE (meV/atom)", "energy_mae_mev_per_atom"), ("force MAE (meV/Å)", "forces_mae_mev_per_a"),
            ("epochs", "epochs"), ("training wall time (s)", "train_seconds")]
    for label, key in rows:
        cells = []
        for v in shown:
            x = res["variants"][v].get(key)
            cells.append("–" if x is None else (f"{x:.3f}" if isinstance(x, float) else str(x)))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    xtb = next(iter(res["variants"].values()))["xtb_charged_mae_vs_formal_e"]
    lines += ["", f"For scale: the xTB charges themselves are {xtb:.3f} e from the formal ones on these monomers "
              f"(charge transfer at contact). Training scale (force RMS): {res['scale']:.3f} eV/Å."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(DEFAULT_DATA), help="folder with dimers.xyz (default ../shared/data)")
    p.add_argument("--max-frames", type=int, default=0, help="first N frames only (0: all)")
    p.add_argument("--replace", action="store_true",
                   help="write only this run's columns (default: keep the other columns of an earlier results "
                        "file with the same settings)")
    add_study_arguments(p, variants=VARIANTS, out=str(HERE / "results" / "charge_units"), epochs=12,
                        quick_help="smoke test: 1 epoch on 200 frames, results not written")
    args = p.parse_args(argv)
    variants = study_variants(p, args, VARIANTS)
    path = Path(args.data_dir) / "dimers.xyz"
    if not path.is_file():
        p.error(f"{path} not found: pass --data-dir, the folder that holds dimers.xyz")
    if args.quick:
        args.epochs, args.max_frames = 1, 200

    from ase.io import read

    frames = read(path, ":")
    if args.max_frames:
        frames = frames[: args.max_frames]
    dtype = getattr(torch, args.dtype)
    graphs = read_dataset(frames, args.cutoff, require=("energy", "forces"), dtype=dtype)
    species = sorted({int(z) for a in frames for z in a.numbers})
    rest, test_idx = split(len(graphs), valid_fraction=0.2, seed=args.seed)  # the split of long_range.py
    tr, va = split(len(rest), valid_fraction=0.1, seed=args.seed + 1)
    train_idx, valid_idx = rest[tr], rest[va]
    test_frames = [frames[k] for k in test_idx]
    monomers = monomer_table(test_frames)

    res = {"meta": {**stamp(), "epochs": args.epochs, "budget_s": args.budget, "channels": args.channels,
                    "cutoff": args.cutoff, "seed": args.seed, "dtype": args.dtype},
           "n_train": len(train_idx), "n_valid": len(valid_idx), "n_test": len(test_idx), "variants": {}}
    for variant in variants:
        now = machine_info()
        measured = {"git_commit": now["git_commit"], "git_dirty": now.get("git_dirty"), "date": now["date"],
                    "loadavg_1min": now["loadavg_1min"]}
        torch.manual_seed(args.seed)
        model = cartlorem.CartLorem(species, cutoff=args.cutoff, long_range="multipole", channels=args.channels,
                                    num_layers=2, correlation=2,
                                    long_range_options=LONG_RANGE_OPTIONS.get(variant)).to(dtype)
        hook = scaled_electrostatics(model) if variant == "scaled_es" else None
        t0 = time.perf_counter()
        result = train(model, [graphs[k] for k in train_idx], [graphs[k] for k in valid_idx], epochs=args.epochs,
                       batch_size=args.batch_size, lr=args.lr, max_time=args.budget, patience=None, seed=args.seed,
                       progress=False, weights={"energy": args.energy_weight, "forces": 1.0})
        wall = time.perf_counter() - t0
        model.eval()
        charges, e_mae, f_mae = predict_charges(model, [graphs[k] for k in test_idx])
        per_frame = np.split(charges, np.cumsum([len(a) for a in test_frames])[:-1])
        a0 = float(model.long_range_block.coupling[0].detach())
        scale = float(model.scale)
        out = score(monomers, per_frame, a0 * (scale if hook is not None else 1.0))
        out.update(energy_mae_mev_per_atom=e_mae, forces_mae_mev_per_a=f_mae, coupling=
                   model.long_range_block.coupling.detach().tolist(), epochs=int(result.epochs_completed),
                   train_seconds=round(wall, 1), measured=measured)
        measured["loadavg_1min_end"] = machine_info()["loadavg_1min"]
        res["variants"][variant] = out
        res["scale"] = scale
        print(f"{variant:10s} charged MAE vs formal {out['charged_mae_vs_formal_e']:.3f} e "
              f"(>= 8 A: {out['charged_far_mae_vs_formal_e']}), eff. coupling {out['effective_coupling_0']:.3f}, "
              f"E {e_mae:.2f} meV/atom, F {f_mae:.1f} meV/A, {wall:.0f} s", flush=True)
        if hook is not None:
            hook.remove()
    if not args.quick and not args.replace:
        kept = merge_earlier(res, Path(args.out).with_suffix(".json"))
        if kept:
            print(f"kept the columns {', '.join(kept)} of {Path(args.out).with_suffix('.json')}", flush=True)
    md = to_markdown(res)
    print(md)
    if not args.quick:
        write_json_md(args.out, res, md)


if __name__ == "__main__":
    main()
