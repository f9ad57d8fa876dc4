"""Accuracy at equal training budget: cartlorem (none, lorem, multipole) against MACE.

Same data, same split, same loss and optimiser, same budget per model: ``--epochs N`` (the same
number of epochs for every model: the fair budget on a shared machine, used for the reported run) or
``--budget S`` seconds of wall-clock training (the epochs that fit):

* data: <set>.xyz (dimers, nacl, sn2, nacl_pbc) from ``--data-dir`` (default ../shared/data), split as
  every study (``harness.load_split``): ``split(len, 0.2, seed)`` for the test set, then
  ``split(len(rest), 0.1, seed + 1)`` of the rest for validation;
* models: ``CartLorem(long_range=None | "lorem" | "multipole")`` and MACE (``ScaleShiftMACE``,
  built by ``harness.build_mace`` at matched settings: 5 Å cutoff, features up to l = 2 with the same
  C channels, the same correlation, 2 interactions, max_ell 2, 8 Bessel, p = 5 envelope, radial MLP
  3 × 64, readout MLP 16; its reference energies, ⟨neighbours⟩, scale and shift from the training
  set exactly as cartlorem.train sets them);
* training: one loop for every model, ``cartlorem.train.train`` (the same ``weighted_loss``, AMSGrad,
  gradient clipping at 10, EMA 0.99, validation with the EMA weights, ReduceLROnPlateau 0.8/5,
  best-validation weights kept, the same ``max_time`` and epoch rules); MACE enters it through a
  wrapper with cartlorem's model contract, on the same batches converted to MACE's input dict;
* report: energy (meV/atom) and force (meV/Å) MAE and RMSE on the test set, overall and by group
  (``harness.groups_for``: dimers by class and by separation < 5, 5–8, ≥ 8 Å, ...), number of
  epochs that fit the budget, parity plots and learning curves.

MACE runs in benchmarks/.venv-peers (``bash benchmarks/setup_peers.sh``); without it its column
says "not installed".

    python benchmarks/accuracy.py --quick                     # smoke test: 20 s per model, 120 frames
    python benchmarks/accuracy.py --sets dimers --epochs 10 --threads 1  # the study in benchmarks/README.md

Writes benchmarks/results/accuracy.json and .md, accuracy.<set>.parity.png and
accuracy.<set>.curves.png (machine, versions, load and git commit stamped).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project: cartlorem and benchmarks
from benchmarks.harness import (MACE_MISSING, PEER_PYTHON, MaceModel, add_data_argument,  # noqa: E402
                                add_training_arguments, build_mace, group_errors, groups_for, load_split,
                                machine_info)

VARIANTS = ["none", "lorem", "multipole", "mace"]
LABEL = {"none": "cartlorem none", "lorem": "cartlorem lorem", "multipole": "cartlorem multipole", "mace": "MACE"}
TARGET_RATIO = 2.0  # multipole force MAE on dimers beyond 8 Å at least 2× lower than MACE's


# --------------------------------------------------------------------------------------------------
# data and metrics

def errors_by_group(pred, masks) -> dict:
    """harness.group_errors (MAE) plus the RMSE of the same groups."""
    res = group_errors(pred, masks)
    e_err = (pred.energy_pred - pred.energy_ref) / pred.n_atoms * 1000.0  # [M] meV/atom
    f_err = (pred.forces_pred - pred.forces_ref) * 1000.0  # [N, 3] meV/Å
    for g, m in masks.items():
        if g in res:
            res[g]["energy_rmse_mev_per_atom"] = float(np.sqrt(np.mean(e_err[m] ** 2)))
            res[g]["forces_rmse_mev_per_a"] = float(np.sqrt(np.mean(f_err[m[pred.structure]] ** 2)))
    return res


def parity_arrays(pred) -> dict:
    return {"energy_ref": (pred.energy_ref / pred.n_atoms).tolist(), "energy_pred": (pred.energy_pred / pred.n_atoms).tolist(),
            "forces_ref": pred.forces_ref.ravel().tolist(), "forces_pred": pred.forces_pred.ravel().tolist()}


def history_rows(history) -> list:
    keys = ("epoch", "train_loss", "valid_loss", "valid_energy_mae_mev_per_atom", "valid_forces_mae_mev_per_a",
            "epoch_time_s", "elapsed_s")
    return [{k: r.get(k) for k in keys} for r in history]


# --------------------------------------------------------------------------------------------------
# one model on one set (MACE in the peers venv, through --peer-worker)

def run_variant(name: str, variant: str, args) -> dict:
    import torch

    from cartlorem.data import dataset_statistics, fit_reference_energies
    from cartlorem.evaluate import metrics, predict
    from cartlorem.train import train

    frames, graphs, species, train_idx, valid_idx, test_idx = load_split(name, args)
    masks = groups_for(name, [frames[k] for k in test_idx])
    train_g = [graphs[k] for k in train_idx]
    valid_g = [graphs[k] for k in valid_idx]
    test_g = [graphs[k] for k in test_idx]
    dtype = getattr(torch, args.dtype)
    weights = {"energy": args.energy_weight, "forces": 1.0}
    torch.manual_seed(args.seed)
    t0, c0 = time.perf_counter(), time.process_time()
    load0 = os.getloadavg()[0]
    if variant == "mace":
        refs = fit_reference_energies(train_g, species)
        stats = dataset_statistics(train_g, refs)
        torch.set_default_dtype(dtype)
        mace = build_mace(species, args.channels, args.cutoff, atomic_energies=refs,
                          avg_num_neighbors=stats["avg_num_neighbors"],
                          scale=stats["forces_rms"] or stats["residual_energy_per_atom_std"] or 1.0,
                          shift=stats["residual_energy_per_atom_mean"], correlation=args.correlation)
        model = MaceModel(mace, species).to(dtype)
        t0, c0 = time.perf_counter(), time.process_time()
        load0 = os.getloadavg()[0]
    else:
        import cartlorem

        lr = None if variant == "none" else variant
        model = cartlorem.CartLorem(species, cutoff=args.cutoff, long_range=lr, channels=args.channels,
                                    num_layers=2, correlation=args.correlation, lmax=2, num_basis=8,
                                    radial_hidden=64, readout_hidden=16).to(dtype)
    # one loop for every model; MACE's statistics were set when it was built (statistics=False)
    res = train(model, train_g, valid_g, epochs=args.epochs or 10**6, batch_size=args.batch_size, lr=args.lr,
                max_time=None if math.isinf(args.budget) else args.budget, patience=None, seed=args.seed,
                progress=False, weights=weights, statistics=variant != "mace")
    history = res.history
    wall = time.perf_counter() - t0
    cpu = time.process_time() - c0
    load1 = os.getloadavg()[0]
    pred = predict(model, test_g, batch_size=16)
    return {"variant": variant, "epochs": len(history), "train_seconds": wall, "train_cpu_seconds": cpu,
            "loadavg_1min_start": round(load0, 2), "loadavg_1min_end": round(load1, 2),
            "cpu_seconds_per_epoch": cpu / max(len(history), 1),
            "n_parameters": int(sum(p.numel() for p in model.parameters())),
            "test": metrics(pred), "groups": errors_by_group(pred, masks), "history": history_rows(history),
            "parity": parity_arrays(pred),
            "n_train": len(train_idx), "n_valid": len(valid_idx), "n_test": len(test_idx)}


def run_mace_subprocess(name: str, args) -> dict:
    if not PEER_PYTHON.exists():
        return {"variant": "mace", "status": MACE_MISSING}
    spec = {k: v for k, v in vars(args).items() if k not in ("peer_worker",)}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "mace.json"
        cmd = [str(PEER_PYTHON), str(Path(__file__).resolve()), "--peer-worker", json.dumps({"set": name, "out": str(out),
                                                                                             "args": spec})]
        env = dict(os.environ, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1", PYTHONWARNINGS="ignore")
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=None if math.isinf(args.budget) else args.budget * 3 + 600)
        except subprocess.TimeoutExpired:
            return {"variant": "mace", "status": "failed: timed out"}
        if r.returncode != 0 or not out.exists():
            err = r.stderr.strip().splitlines()
            if any("No module named 'mace'" in ln for ln in err):
                return {"variant": "mace", "status": MACE_MISSING}
            return {"variant": "mace", "status": f"failed: {(err or ['?'])[-1][:300]}"}
        return json.loads(out.read_text())


# --------------------------------------------------------------------------------------------------
# report

def to_markdown(all_results, meta) -> str:
    m = meta
    lines = [f"# Accuracy at equal budget: cartlorem vs MACE ({m['date']}, commit {(m['git_commit'] or '?')[:10]}"
             f"{', dirty tree' if m.get('git_dirty') else ''})", "",
             f"Machine: {m['cpu_model']}, {m['cpu_affinity']} cores, torch {m['torch']}, MACE {m.get('mace', '?')}. "
             f"Load average (1 min) {m['loadavg_1min']} at start, {m.get('loadavg_1min_end')} at the end on "
             f"{m['cpu_count']} CPUs" + (" — shared machine: fewer epochs fit the budget than on an idle one."
                                         if (m.get('loadavg_1min_end') or 0) > (m['cpu_affinity'] or 1) else "."),
             "", (f"Budget **{m['epochs']} epochs per model** (the same for every model; training wall and CPU "
                  f"time are listed)" if m.get('epochs') else
                  f"Budget **{m['budget']:g} s wall-clock training per model** (validation included; the epochs "
                  f"that fit are listed)") + f", {m['dtype']}, C = {m['channels']} channels (features up to rank / l = 2), correlation "
             f"{m['correlation']}, 2 interactions, cutoff {m['cutoff']} Å, batch {m['batch_size']}, AMSGrad lr "
             f"{m['lr']:g}, loss weights energy {m['energy_weight']:g} / forces 1 / stress 1, EMA 0.99, seed "
             f"{m['seed']}. Split as long_range.py. Test-set errors: energy meV/atom, forces meV/Å, as MAE / RMSE.", ""]
    for name, r in all_results.items():
        ok = {v: x for v, x in r["variants"].items() if "groups" in x}
        any_ok = next(iter(ok.values()), None)
        if any_ok is None:
            lines += [f"## {name}: no model ran", ""]
            continue
        lines += [f"## {name} (train {any_ok['n_train']}, valid {any_ok['n_valid']}, test {any_ok['n_test']})", "",
                  "| group | n | " + " | ".join(f"{LABEL[v]} E MAE / RMSE | F MAE / RMSE" for v in r["variants"]) + " |",
                  "|---|---|" + "---|---|" * len(r["variants"])]
        for g in any_ok["groups"]:
            cells = []
            for v, x in r["variants"].items():
                if "groups" not in x:
                    cells += [x.get("status", "—"), ""]
                    continue
                e = x["groups"][g]
                cells += [f"{e['energy_mae_mev_per_atom']:.2f} / {e['energy_rmse_mev_per_atom']:.2f}",
                          f"{e['forces_mae_mev_per_a']:.1f} / {e['forces_rmse_mev_per_a']:.1f}"]
            lines.append(f"| {g} | {any_ok['groups'][g]['n']} | " + " | ".join(cells) + " |")
        lines.append("| epochs in budget | | " + " | ".join(f"{x.get('epochs', '—')} | " for x in r["variants"].values()) + "|")
        lines.append("| parameters | | " + " | ".join(f"{x.get('n_parameters', '—')} | " for x in r["variants"].values()) + "|")
        lines.append("| training CPU s per epoch | | " + " | ".join(
            f"{x['cpu_seconds_per_epoch']:.0f} | " if x.get("cpu_seconds_per_epoch") else "— | "
            for x in r["variants"].values()) + "|")
        lines.append("| load average during training (start–end) | | " + " | ".join(
            f"{x['loadavg_1min_start']}–{x['loadavg_1min_end']} | " if "loadavg_1min_start" in x else "— | "
            for x in r["variants"].values()) + "|")
        lines.append("")
        lines += [f"Parity plots: `accuracy.{name}.parity.png`; learning curves: `accuracy.{name}.curves.png`.", ""]
    t = meta.get("target")
    if t:
        verdict = {True: "**met**", False: "**missed**", None: "not measured"}[t["met"]]
        lines += ["## Target", "", f"- {t['target']}: {verdict}" + (f" — multipole {t['multipole']:.1f} meV/Å vs MACE "
                  f"{t['mace']:.1f} meV/Å, ratio {t['ratio']:.2f}×" if t.get("ratio") else ""), ""]
    return "\n".join(lines)


def plots(name, r, stem) -> None:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return
    ok = {v: x for v, x in r["variants"].items() if "parity" in x}
    if not ok:
        return
    fig = Figure(figsize=(3.2 * len(ok), 6.2), layout="constrained")
    FigureCanvasAgg(fig)
    for k, (v, x) in enumerate(ok.items()):
        for row, (what, unit) in enumerate((("energy", "eV/atom"), ("forces", "eV/Å"))):
            ax = fig.add_subplot(2, len(ok), row * len(ok) + k + 1)
            ref, pred = np.array(x["parity"][f"{what}_ref"]), np.array(x["parity"][f"{what}_pred"])
            lo, hi = float(min(ref.min(), pred.min())), float(max(ref.max(), pred.max()))
            ax.plot([lo, hi], [lo, hi], color="0.6", lw=1)
            ax.scatter(ref, pred, s=3, alpha=0.4)
            key = "energy_mae_mev_per_atom" if what == "energy" else "forces_mae_mev_per_a"
            ax.set_title(f"{LABEL[v]}\n{what} MAE {x['test'][key]:.2f} meV", fontsize=9)
            ax.set_xlabel(f"reference ({unit})", fontsize=8)
            ax.set_ylabel(f"predicted ({unit})", fontsize=8)
    fig.savefig(f"{stem}.{name}.parity.png", dpi=100)

    fig = Figure(figsize=(11, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    for k, (key, title) in enumerate((("valid_loss", "validation loss"),
                                      ("valid_energy_mae_mev_per_atom", "valid energy MAE (meV/atom)"),
                                      ("valid_forces_mae_mev_per_a", "valid force MAE (meV/Å)"))):
        ax = fig.add_subplot(1, 3, k + 1)
        for v, x in ok.items():
            pts = [(h["elapsed_s"], h[key]) for h in x["history"] if h.get(key)]
            if pts:
                ax.plot(*zip(*pts), "o-", ms=3, label=LABEL[v])
        ax.set_yscale("log")
        ax.set_xlabel("training wall time (s)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.savefig(f"{stem}.{name}.curves.png", dpi=100)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_argument(p)
    p.add_argument("--sets", default="dimers")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma list of none, lorem, multipole, mace")
    p.add_argument("--skip-mace", action="store_true")
    p.add_argument("--epochs", type=int, default=0, help="training epochs per model (0: as many as --budget allows)")
    p.add_argument("--budget", type=float, default=None,
                   help="training wall-clock seconds per model (default: 240 without --epochs, none with it)")
    add_training_arguments(p)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--quick", action="store_true", help="smoke test: 20 s budget, 120 frames")
    p.add_argument("--out", default=str(HERE / "results" / "accuracy"))
    p.add_argument("--peer-worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.peer_worker:  # inside the peers venv: train MACE on one set, write the result JSON
        job = json.loads(args.peer_worker)
        args = argparse.Namespace(**job["args"])
        if args.threads:
            import torch
            torch.set_num_threads(args.threads)
        res = run_variant(job["set"], "mace", args)
        Path(job["out"]).write_text(json.dumps(res))
        return

    import torch

    if args.budget is None:
        args.budget = math.inf if args.epochs else 240.0
    if args.quick:
        args.budget, args.max_frames, args.epochs = 20.0, 120, 0
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.skip_mace and "mace" in variants:
        variants.remove("mace")
    meta = {**machine_info(), **{k: v for k, v in vars(args).items() if k != "peer_worker"}}
    if math.isinf(meta["budget"]):
        meta["budget"] = None  # no wall-clock limit (strict JSON has no Infinity)
    if PEER_PYTHON.exists():
        r = subprocess.run([str(PEER_PYTHON), "-c", "from importlib.metadata import version as v; import e3nn; "
                            "print(v('mace-torch'), 'e3nn', e3nn.__version__)"], capture_output=True, text=True,
                           env=dict(os.environ, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1"))
        meta["mace"] = r.stdout.strip().splitlines()[-1] if r.returncode == 0 and r.stdout.strip() else MACE_MISSING
    else:
        meta["mace"] = MACE_MISSING
    all_results = {}
    for name in [s.strip() for s in args.sets.split(",") if s.strip()]:
        all_results[name] = {"variants": {}}
        for v in variants:
            print(f"[{name}] training {LABEL[v]} for " + (f"{args.epochs} epochs" if args.epochs else f"{args.budget:g} s")
                  + " ...", flush=True)
            if v == "mace":
                res = run_mace_subprocess(name, args)
            else:
                try:
                    res = run_variant(name, v, args)
                except Exception as err:  # report, do not lose the other models' results
                    res = {"variant": v, "status": f"failed: {type(err).__name__}: {str(err)[:300]}"}
            all_results[name]["variants"][v] = res
            if "test" in res:
                t = res["test"]
                print(f"[{name}] {LABEL[v]:20s} epochs={res['epochs']:4d}  E MAE {t['energy_mae_mev_per_atom']:.2f} "
                      f"meV/atom  F MAE {t['forces_mae_mev_per_a']:.1f} meV/Å  ({res['train_seconds']:.0f} s)", flush=True)
            else:
                print(f"[{name}] {LABEL[v]}: {res.get('status')}", flush=True)
        meta["loadavg_1min_end"] = round(os.getloadavg()[0], 2)
        d = all_results.get("dimers", {}).get("variants", {})
        if "multipole" in d and "mace" in d and "groups" in d["multipole"] and "groups" in d["mace"] \
                and "sep>=8" in d["mace"]["groups"]:
            a, b = d["multipole"]["groups"]["sep>=8"]["forces_mae_mev_per_a"], d["mace"]["groups"]["sep>=8"]["forces_mae_mev_per_a"]
            meta["target"] = {"target": "multipole force MAE on dimers beyond 8 Å at least 2x lower than MACE's",
                              "multipole": a, "mace": b, "ratio": b / a, "met": b / a >= TARGET_RATIO}
        else:
            meta["target"] = {"target": "multipole force MAE on dimers beyond 8 Å at least 2x lower than MACE's",
                              "met": None}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out + ".json", "w") as f:
            json.dump({"name": "accuracy", "meta": meta, "results": all_results}, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(to_markdown(all_results, meta) + "\n")
        plots(name, all_results[name], args.out)
    print(to_markdown(all_results, meta))


if __name__ == "__main__":
    main()
