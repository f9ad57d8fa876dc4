"""Accuracy at equal training budget: cartlorem (none, lorem, multipole) against MACE.

Same data, same split, same loss and optimiser, same budget per model: ``--epochs N`` (the same
number of epochs for every model: the fair budget on a shared machine, used for the reported run) or
``--budget S`` seconds of wall-clock training (the epochs that fit). Towards convergence:
``--patience P --budget S`` trains every model until its validation loss has not improved for P epochs
(early stopping, the best-validation weights kept) or until S seconds of wall clock, whichever comes
first (epochs unlimited unless ``--epochs`` is given); each model's stop reason, best-validation
epoch, wall and CPU time and learning curve are recorded, with a rough extrapolation of the epochs
its curve still needed (``convergence``):

* data: <set>.xyz (dimers, nacl, sn2, nacl_pbc, cumulene) from ``--data-dir`` (default ../shared/data), split as
  every study (``harness.load_split``): ``split(len, 0.2, seed)`` for the test set, then
  ``split(len(rest), 0.1, seed + 1)`` of the rest for validation;
* models: ``CartLorem(long_range=None | "lorem" | "multipole")`` and MACE (``ScaleShiftMACE``,
  built by ``harness.build_mace`` at matched settings: 5 Å cutoff, features up to l = 2 with the same
  C channels, the same correlation, 2 interactions, max_ell 2, 8 Bessel, p = 5 envelope, radial MLP
  3 × 64, readout MLP 16; its reference energies, ⟨neighbours⟩, scale and shift from the training
  set exactly as cartlorem.train sets them);
* training: one loop for every model, ``cartlorem.train.train`` (the same ``weighted_loss``, AMSGrad,
  gradient clipping at 10, EMA 0.99, validation with the EMA weights, ReduceLROnPlateau (train()'s factor and
  patience unless --scheduler-factor / --scheduler-patience),
  best-validation weights kept, the same ``max_time`` and epoch rules); MACE enters it through a
  wrapper with cartlorem's model contract, on the same batches converted to MACE's input dict;
* report: energy (meV/atom) and force (meV/Å) MAE and RMSE on the test set, overall and by group
  (``harness.groups_for``: dimers by class and by separation < 5, 5–8, ≥ 8 Å, cumulene by torsion
  angle, ...), on dimers also the intermolecular force (the net force on each monomer, i.e. on its
  centre of mass: the sum of the forces on its atoms) by group, number of epochs that fit the budget,
  parity plots and learning curves.

MACE runs in benchmarks/.venv-peers (``bash benchmarks/setup_peers.sh``); without it its column
says "not installed".

    python benchmarks/accuracy.py --quick                     # smoke test: 20 s per model, 120 frames
    python benchmarks/accuracy.py --sets dimers --epochs 10 --threads 1  # the study in benchmarks/README.md
    python benchmarks/accuracy.py --channels 32 --patience 20 --budget 900 --threads 1 \
        --out benchmarks/results/converged                    # early stopping, 15 min wall cap per model
    python benchmarks/accuracy.py --combine a.json b.json --out benchmarks/results/converged
                                                              # runs made in parallel, side by side

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
from typing import Optional

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project: cartlorem and benchmarks
from benchmarks.harness import (MACE_MISSING, add_data_argument, command_line,  # noqa: E402
                                add_training_arguments, group_errors, groups_for, load_split, machine_info,
                                mace_for_training_set, peer_python)

VARIANTS = ["none", "lorem", "multipole", "mace"]
LABEL = {"none": "cartlorem none", "lorem": "cartlorem lorem", "multipole": "cartlorem multipole", "mace": "MACE"}
TARGET_RATIO = 2.0  # multipole force MAE on dimers beyond 8 Å at least 2× lower than MACE's
TARGET_CUMULENE_MEV = 5.0  # multipole energy MAE on cumulene at most 5 meV/atom
PLATEAU_WINDOW, PLATEAU_GAIN = 20, 0.01  # "converged": PLATEAU_WINDOW more epochs lower the loss < 1 %


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


def intermolecular_errors(pred, frames, masks) -> dict:
    """Dimers: MAE (meV/Å, per Cartesian component) of the net force on each monomer by group.

    The net force on a monomer (the sum of the forces on its atoms: the force on its centre of mass)
    is the force the other monomer exerts on it; the intramolecular forces cancel in the sum. Monomer
    A is the first ``info["monomer_a_atoms"]`` atoms of each frame, B the rest; both enter the mean.
    Returns {group: {"n": frames, "intermolecular_force_mae_mev_per_a": …,
    "intermolecular_force_ref_mean_abs_mev_per_a": …}}.
    """
    from benchmarks.intermolecular import monomer_net_forces

    net = {key: monomer_net_forces(frames, f) for key, f in (("pred", pred.forces_pred), ("ref", pred.forces_ref))}
    err = np.abs(net["pred"] - net["ref"]) * 1000.0  # [M, 2, 3] meV/Å
    return {g: {"n": int(m.sum()), "intermolecular_force_mae_mev_per_a": float(err[m].mean()),
                "intermolecular_force_ref_mean_abs_mev_per_a": float(np.abs(net["ref"][m]).mean() * 1000.0)}
            for g, m in masks.items() if m.any()}


def convergence(history, cpu_seconds: float) -> dict:
    """Was the validation loss still improving when training stopped, and how far from a plateau?

    From (at least 4) per-epoch validation losses: the best epoch and the epochs run after it; the relative
    gain of the best loss over the last quarter of the run (at least 5 epochs); and a power law
    fitted to the running best loss over the second half of the run (best ∝ epoch^slope), from
    which ``plateau_epochs`` is the epoch where PLATEAU_WINDOW more epochs would lower the loss by
    less than PLATEAU_GAIN (1 %), and ``plateau_cpu_s`` its CPU time at this run's CPU s per epoch.
    A rough extrapolation (learning-rate steps and noise bend real curves); None where it cannot
    be made (too few epochs, or no decrease over the second half).
    """
    losses = np.array([h["valid_loss"] for h in history], float)
    n = len(losses)
    if n < 4 or not np.isfinite(losses).any():  # too short a curve to say anything
        return {"epochs": n}
    best = np.minimum.accumulate(np.where(np.isfinite(losses), losses, np.inf))
    best_epoch = int(np.argmax(best == best[-1]) + 1)  # the first epoch that reached the final best
    window = max(5, n // 4)
    before = best[n - window - 1] if n > window else best[0]
    res = {"epochs": n, "best_epoch": best_epoch, "epochs_after_best": n - best_epoch,
           "window_epochs": min(window, n - 1), "gain_over_window": float(1.0 - best[-1] / before),
           "slope": None, "plateau_epochs": None, "plateau_cpu_s": None}
    lo = n // 2
    if n - lo >= 4:
        x, y = np.log(np.arange(lo + 1, n + 1)), np.log(best[lo:])
        slope = float(np.polyfit(x, y, 1)[0])
        res["slope"] = slope
        if slope < 0:
            plateau = PLATEAU_WINDOW / (_plateau_factor(slope) - 1.0)
            res["plateau_epochs"] = int(max(math.ceil(plateau), n))
            res["plateau_cpu_s"] = float(res["plateau_epochs"] * cpu_seconds / n)
    return res


def _plateau_factor(slope: float) -> float:
    """(1 + W / E) at which (1 + W / E)^slope = 1 − PLATEAU_GAIN: the plateau criterion of ``convergence``;
    inf for a curve so flat that the factor overflows (the plateau is then already reached)."""
    log_factor = math.log1p(-PLATEAU_GAIN) / slope
    return math.exp(log_factor) if log_factor < 700.0 else math.inf


def parity_arrays(pred) -> dict:
    return {"energy_ref": (pred.energy_ref / pred.n_atoms).tolist(), "energy_pred": (pred.energy_pred / pred.n_atoms).tolist(),
            "forces_ref": pred.forces_ref.ravel().tolist(), "forces_pred": pred.forces_pred.ravel().tolist()}


def history_rows(history) -> list:
    keys = ("epoch", "lr", "train_loss", "valid_loss", "valid_energy_mae_mev_per_atom", "valid_forces_mae_mev_per_a",
            "epoch_time_s", "elapsed_s")
    return [{k: r.get(k) for k in keys} for r in history]


# --------------------------------------------------------------------------------------------------
# one model on one set (MACE in the peers venv, through --peer-worker)

def run_variant(name: str, variant: str, args) -> dict:
    import torch

    from cartlorem.evaluate import metrics, predict
    from cartlorem.train import train

    frames, graphs, species, train_idx, valid_idx, test_idx = load_split(name, args)
    test_frames = [frames[k] for k in test_idx]
    masks = groups_for(name, test_frames)
    train_g = [graphs[k] for k in train_idx]
    valid_g = [graphs[k] for k in valid_idx]
    test_g = [graphs[k] for k in test_idx]
    dtype = getattr(torch, args.dtype)
    weights = {"energy": args.energy_weight, "forces": 1.0}
    torch.manual_seed(args.seed)
    t0, c0 = time.perf_counter(), time.process_time()
    load0 = os.getloadavg()[0]
    if variant == "mace":
        model = mace_for_training_set(species, train_g, args.channels, args.cutoff, args.correlation, dtype)
        t0, c0 = time.perf_counter(), time.process_time()
        load0 = os.getloadavg()[0]
    else:
        import cartlorem

        lr = None if variant == "none" else variant
        options = {}
        if getattr(args, "placement", None):
            options["placement"] = args.placement
        if getattr(args, "charge_channels", None):
            options["charge_channels"] = None if args.charge_channels == "all" else int(args.charge_channels)
        if getattr(args, "end_features", None):
            options["end_features"] = args.end_features
        options = options if lr is not None and options else None
        model = cartlorem.CartLorem(species, cutoff=args.cutoff, long_range=lr, channels=args.channels,
                                    num_layers=2, correlation=args.correlation, lmax=2, num_basis=8,
                                    radial_hidden=64, readout_hidden=16, long_range_options=options).to(dtype)
    # one loop for every model; MACE's statistics were set when it was built (statistics=False)
    patience = getattr(args, "patience", None)
    folder = Path(args.run_dir) / name / variant if getattr(args, "run_dir", None) else None
    sessions = _load_sessions(folder, args, _block_options(model))
    scheduler = {k: getattr(args, k) for k in ("scheduler_patience", "scheduler_factor")
                 if getattr(args, k, None) is not None}
    res = train(model, train_g, valid_g, epochs=args.epochs or 10**6, batch_size=args.batch_size, lr=args.lr,
                max_time=None if math.isinf(args.budget) else args.budget, patience=patience, seed=args.seed,
                progress=False, weights=weights, statistics=variant != "mace", out_dir=folder,
                resume=bool(sessions), compile=bool(getattr(args, "compile", False)) and variant != "mace", **scheduler)
    history = res.history
    sessions.append({"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "commit": getattr(args, "commit", None),
                     "epochs_before": sessions[-1]["epochs_after"] if sessions else 0, "epochs_after": len(history),
                     "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
                     "compile": bool(getattr(args, "compile", False)) and variant != "mace"})
    if folder is not None:
        (folder / "sessions.json").write_text(json.dumps({"settings": _study_settings(args), "sessions": sessions,
                                                          "long_range_options": _block_options(model)},
                                                         indent=1))
    wall, cpu = sum(x["wall_s"] for x in sessions), sum(x["cpu_s"] for x in sessions)
    load1 = os.getloadavg()[0]
    pred = predict(model, test_g, batch_size=16)
    out = {"variant": variant, "epochs": len(history), "train_seconds": wall, "train_cpu_seconds": cpu,
           "stop_reason": res.stop_reason, "best_epoch": res.best_epoch, "best_valid_loss": res.best_valid_loss,
           "patience": patience, "loadavg_1min_start": round(load0, 2), "loadavg_1min_end": round(load1, 2),
           "cpu_seconds_per_epoch": cpu / max(len(history), 1),
           "n_parameters": int(sum(p.numel() for p in model.parameters())),
           "test": metrics(pred), "groups": errors_by_group(pred, masks), "history": history_rows(history),
           "convergence": convergence(history, cpu), "parity": parity_arrays(pred),
           "long_range_options": _block_options(model),
           "n_train": len(train_idx), "n_valid": len(valid_idx), "n_test": len(test_idx), "sessions": sessions}
    if name == "dimers":
        out["intermolecular"] = intermolecular_errors(pred, test_frames, masks)
    return out


def _block_options(model) -> dict:
    """The long-range block's placement and charge channels the model ran with (empty without a block)."""
    block = getattr(model, "long_range_block", None)
    if block is None:
        return {}
    return {"placement": model.placement, "charge_channels": block.charge_channels, "lr_channels": block.lr_channels,
            "end_features": model.config["long_range_options"].get("end_features", "full")}


#: the arguments a study continued with --run-dir must keep (the data, split, model and training rules)
STUDY_SETTINGS = ("data_dir", "channels", "correlation", "cutoff", "batch_size", "lr", "energy_weight", "dtype",
                  "seed", "patience", "epochs", "placement", "charge_channels", "end_features", "test_fraction",
                  "max_frames", "scheduler_patience", "scheduler_factor")


def _study_settings(args) -> dict:
    return {k: str(getattr(args, k, None)) for k in STUDY_SETTINGS}


def _load_sessions(folder, args, block_options=None) -> list:
    """The earlier sessions of a model trained in ``folder`` (--run-dir), [] for a new one; refuses to continue
    a run whose checkpoint is missing or whose settings differ, the long-range block's placement and charge
    channels as the model resolved them included (a study left to the model's defaults must not continue
    under other defaults)."""
    if folder is None:
        return []
    record, checkpoint = folder / "sessions.json", folder / "checkpoint.pt"
    if not record.exists():
        if checkpoint.exists():
            raise SystemExit(f"--run-dir: {folder} has a checkpoint but no sessions.json; remove it or use another "
                             "--run-dir")
        return []
    saved = json.loads(record.read_text())
    before = {k: saved["settings"].get(k, "None") for k in STUDY_SETTINGS}  # a key added later: its default
    changed = {k: (v, before[k]) for k, v in _study_settings(args).items() if before[k] != v}
    saved_options = dict(saved.get("long_range_options") or {})
    if saved_options and "end_features" not in saved_options:  # recorded before the option: the full features
        saved_options["end_features"] = "full"
    if "long_range_options" in saved and block_options is not None and saved_options != block_options:
        changed["long_range_options"] = (block_options, saved_options)
    if changed:
        detail = "; ".join(f"{k}: {b} before, {a} now" for k, (a, b) in changed.items())
        raise SystemExit(f"--run-dir: {folder} was trained with other settings ({detail})")
    if not checkpoint.exists():
        raise SystemExit(f"--run-dir: {folder}/checkpoint.pt is missing; the earlier sessions cannot be continued")
    return list(saved["sessions"])


def run_mace_subprocess(name: str, args) -> dict:
    python, missing = peer_python()  # the peers venv, or $CARTLOREM_PEER_PYTHON
    if python is None:
        return {"variant": "mace", "status": missing}
    spec = {k: v for k, v in vars(args).items() if k not in ("peer_worker",)}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "mace.json"
        cmd = [python, str(Path(__file__).resolve()), "--peer-worker", json.dumps({"set": name, "out": str(out),
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

def _budget_text(m) -> str:
    if m.get("patience"):
        cap = f"a wall-clock cap of **{m['budget']:g} s per model**" if m.get("budget") else "no wall-clock cap"
        if m.get("run_dir") and m.get("budget"):  # a study spread over sessions (--run-dir)
            cap = (f"a wall-clock cap of **{m['budget']:g} s per model and session** (the models continue from "
                   "their checkpoints in later sessions; the times below add the sessions up)")
        return (f"Early stopping: **patience {m['patience']} epochs** on the validation loss (the best-validation "
                f"weights kept), " + (f"at most {m['epochs']} epochs" if m.get("epochs") else "epochs unlimited")
                + f", {cap} (training and validation; an epoch running at the cap is cut short)")
    if m.get("epochs"):
        return (f"Budget **{m['epochs']} epochs per model** (the same for every model; training wall and CPU "
                f"time are listed)")
    return (f"Budget **{m['budget']:g} s wall-clock training per model** (validation included; the epochs "
            f"that fit are listed)")


def _row(label, variants, cell) -> str:
    return f"| {label} | | " + " | ".join(f"{cell(x) if 'groups' in x else '—'} | " for x in variants.values()) + "|"


def _convergence_rows(variants) -> list:
    def gain(x):
        c = x.get("convergence", {})
        return f"{100 * c['gain_over_window']:.1f} % ({c['window_epochs']} ep.)" if "gain_over_window" in c else "—"

    def plateau(x):
        c = x.get("convergence", {})
        if x.get("stop_reason") == "early_stopping":
            return f"reached: stopped early after {x['epochs']} ep."
        if c.get("plateau_epochs") is None:
            return "—"
        return f"~{c['plateau_epochs']} ep. / {c['plateau_cpu_s'] / 3600:.1f} CPU h"

    return [_row("stop reason", variants, lambda x: x.get("stop_reason", "—")),
            _row("best-validation epoch (epochs after it)", variants,
                 lambda x: f"{x.get('best_epoch', '—')} ({x['epochs'] - x['best_epoch']})" if "best_epoch" in x else "—"),
            _row("training wall s / CPU s", variants,
                 lambda x: f"{x['train_seconds']:.0f} / {x['train_cpu_seconds']:.0f}"),
            _row("sessions (epochs at the end of each)", variants,
                 lambda x: f"{len(x.get('sessions', [])) or 1} ("
                           + ", ".join(str(y["epochs_after"]) for y in x.get("sessions", [])) + ")"),
            _row("valid-loss gain of the best over the last quarter", variants, gain),
            _row("epochs to plateau (power-law extrapolation)", variants, plateau)]


def still_improving(x) -> Optional[bool]:
    """At the stop: False after early stopping (no better validation loss for ``patience`` epochs), else
    True when the best validation loss fell by ≥ PLATEAU_GAIN over the run's last quarter."""
    c = x.get("convergence", {})
    if "gain_over_window" not in c:
        return None
    return x.get("stop_reason") != "early_stopping" and c["gain_over_window"] >= PLATEAU_GAIN


def _column_settings_lines(m) -> list:
    """--combine of runs made with different settings: each column's, after the header (which gives the first
    run's)."""
    cols = m.get("column_settings") or {}
    if not cols:
        return []
    keys = sorted({k for by in cols.values() for x in by.values() for k in x})
    out = [f"**The columns were trained with different settings** ({', '.join(keys)}; the sentence above gives the "
           "first run's; placement and charge channels concern the long-range models only):", ""]
    for name, by in cols.items():
        for v, x in by.items():
            out.append(f"- {name}, {LABEL.get(v, v)}: " + ", ".join(f"{k} {x[k]}" for k in keys if k in x))
    return out + [""]


def to_markdown(all_results, meta) -> str:
    m = meta
    title = "Accuracy towards convergence (early stopping)" if m.get("patience") else "Accuracy at equal budget"
    lines = [f"# {title}: cartlorem vs MACE ({m['date']}, commit {(m['git_commit'] or '?')[:10]}"
             f"{', dirty tree' if m.get('git_dirty') else ''})", "",
             *([f"Command: `{m['command']}`", ""] if m.get("command") else []),
             f"Machine: {m['cpu_model']}, {m['cpu_affinity']} cores, torch {m['torch']}, MACE {m.get('mace', '?')}. "
             f"Load average (1 min) {m['loadavg_1min']} at start, {m.get('loadavg_1min_end')} at the end on "
             f"{m['cpu_count']} CPUs" + (" — shared machine: fewer epochs fit the budget than on an idle one."
                                         if (m.get('loadavg_1min_end') or 0) > (m['cpu_affinity'] or 1) else "."),
             "", _budget_text(m) + f", {m['dtype']}, C = {m['channels']} channels (features up to rank / l = 2), correlation "
             f"{m['correlation']}, 2 interactions, cutoff {m['cutoff']} Å, batch {m['batch_size']}, AMSGrad lr "
             f"{m['lr']:g}, ReduceLROnPlateau factor {_or(m.get('scheduler_factor'), 0.8):g} after "
             f"{_or(m.get('scheduler_patience'), 5)} epochs without a better validation loss, loss weights energy "
             f"{m['energy_weight']:g} / forces 1 / stress 1, EMA 0.99, seed "
             f"{m['seed']}" + (f", long-range block placement {m['placement']}" if m.get("placement") else "")
             + (f", charge channels {m['charge_channels']}" if m.get("charge_channels") else "")
             + (f", end_features {m['end_features']}" if m.get("end_features") else "")
             + ". Split as long_range.py. Test-set errors: energy meV/atom, forces meV/Å, as MAE / RMSE.", ""]
    lines += _column_settings_lines(m)
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
        lines += _convergence_rows(r["variants"])
        lines.append("| parameters | | " + " | ".join(f"{x.get('n_parameters', '—')} | " for x in r["variants"].values()) + "|")
        lines.append("| training CPU s per epoch | | " + " | ".join(
            f"{x['cpu_seconds_per_epoch']:.0f} | " if x.get("cpu_seconds_per_epoch") else "— | "
            for x in r["variants"].values()) + "|")
        lines.append("| load average during training (start–end) | | " + " | ".join(
            f"{x['loadavg_1min_start']}–{x['loadavg_1min_end']} | " if "loadavg_1min_start" in x else "— | "
            for x in r["variants"].values()) + "|")
        lines.append("")
        stem = Path(m.get("out") or "accuracy").name
        lines += [f"Parity plots: `{stem}.{name}.parity.png`; learning curves: `{stem}.{name}.curves.png`.", ""]
        verdicts = [f"{LABEL[v]} {'still improving' if still_improving(x) else 'not improving'} "
                    f"({100 * x['convergence']['gain_over_window']:.1f} % over its last "
                    f"{x['convergence']['window_epochs']} epochs, stop: {x['stop_reason']})"
                    for v, x in ok.items() if still_improving(x) is not None]
        if verdicts:
            lines += ["Validation loss at the stop (best loss over the last quarter of the run vs before it; "
                      f"'still improving' = gain ≥ {100 * PLATEAU_GAIN:g} % and not stopped early): " + "; ".join(verdicts) + ". The "
                      f"plateau estimate fits best ∝ epoch^slope to the second half of the run and asks when "
                      f"{PLATEAU_WINDOW} more epochs would gain < {100 * PLATEAU_GAIN:g} %: a rough extrapolation.", ""]
        inter = {v: x for v, x in ok.items() if "intermolecular" in x}
        if inter:
            first = next(iter(inter.values()))["intermolecular"]
            lines += [f"Intermolecular force on {name} (net force on each monomer = force on its centre of mass, the "
                      "sum over its atoms; MAE per component, meV/Å; reference mean |F|):", "",
                      "| group | n | ref mean abs | " + " | ".join(LABEL[v] for v in inter) + " |",
                      "|---|---|---|" + "---|" * len(inter)]
            for g, e in first.items():
                lines.append(f"| {g} | {e['n']} | {e['intermolecular_force_ref_mean_abs_mev_per_a']:.1f} | " + " | ".join(
                    f"{x['intermolecular'][g]['intermolecular_force_mae_mev_per_a']:.1f}" for x in inter.values()) + " |")
            lines.append("")
    t = meta.get("target")
    if t:
        verdict = {True: "**met**", False: "**missed**", None: "not measured"}[t["met"]]
        lines += ["## Target", "", f"- {t['target']}: {verdict}" + (f" — multipole {t['multipole']:.1f} meV/Å vs MACE "
                  f"{t['mace']:.1f} meV/Å, ratio {t['ratio']:.2f}×" if t.get("ratio") else "")]
        t = meta.get("target_cumulene")
        if t:
            verdict = {True: "**met**", False: "**missed**", None: "not measured"}[t["met"]]
            lines.append(f"- {t['target']}: {verdict}" + (f" — multipole {t['multipole']:.2f} meV/atom" if t.get("multipole") is not None
                                                         else ""))
        lines.append("")
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


def write_report(all_results, meta, args, name) -> None:
    """Targets, then <out>.json / .md and the plots of set ``name``: after every model, so that a long
    run keeps what it has measured if it is stopped."""
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
    c = all_results.get("cumulene", {}).get("variants", {}).get("multipole", {})
    if "cumulene" in all_results:
        e = c["test"]["energy_mae_mev_per_atom"] if "test" in c else None
        meta["target_cumulene"] = {"target": f"multipole energy MAE on cumulene at most {TARGET_CUMULENE_MEV:g} "
                                             "meV/atom", "multipole": e,
                                   "met": None if e is None else e <= TARGET_CUMULENE_MEV}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"name": "accuracy", "meta": meta, "results": all_results}, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(to_markdown(all_results, meta) + "\n")
    plots(name, all_results[name], args.out)


#: settings that make the runs' test sets differ: --combine refuses to put such runs side by side
SAME_TEST_SET = ("seed", "test_fraction", "max_frames")
#: settings the header states once; where the combined runs differ in them, the report lists them per column
COLUMN_SETTINGS = STUDY_SETTINGS + ("budget", "run_dir", "compile", "quick")


def column_settings(parts) -> dict:
    """{set: {variant: {setting: value}}} of the settings (COLUMN_SETTINGS) in which the runs differ, per column;
    {} when they agree. Refuses (SystemExit) runs whose test sets differ (SAME_TEST_SET)."""
    differ = [k for k in COLUMN_SETTINGS if len({json.dumps(part["meta"].get(k)) for part in parts}) > 1]
    bad = [k for k in differ if k in SAME_TEST_SET]
    if bad:
        raise SystemExit("--combine: the runs were made on different test sets (" + "; ".join(
            f"{k}: {', '.join(str(part['meta'].get(k)) for part in parts)}" for k in bad) + ")")
    if not differ:
        return {}
    cols = {}
    for part in parts:
        for name, res in part["results"].items():
            for v in res["variants"]:
                cols.setdefault(name, {})[v] = {k: part["meta"].get(k) for k in differ}
    return {name: {v: by[v] for v in VARIANTS if v in by} for name, by in cols.items()}


def combine(files, args) -> None:
    """One report from the result files of runs made in parallel: the models of each set side by side (in
    the order of VARIANTS), the first run's settings and, where the runs differ in a setting, each column's
    (``column_settings``; runs with different test sets are refused), every run's command, commit and load."""
    parts = [json.loads(Path(f).read_text()) for f in files]
    meta = dict(parts[0]["meta"])
    meta["column_settings"] = column_settings(parts)
    meta["command"] = "; ".join(part["meta"]["command"] for part in parts)
    meta["out"] = args.out  # the plots' names
    meta["combined_from"] = [{k: part["meta"].get(k) for k in ("date", "git_commit", "git_dirty", "command",
                                                               "loadavg_1min", "loadavg_1min_end")}
                             for part in parts]
    for key in ("loadavg_1min", "loadavg_1min_end"):  # the worst of the runs
        meta[key] = max((part["meta"].get(key) or 0) for part in parts)
    commits = {part["meta"].get("git_commit") for part in parts}
    if len(commits) > 1:
        raise SystemExit("--combine: the runs were made on different commits "
                         f"({', '.join(sorted(map(str, commits)))})")
    merged = {}
    for part in parts:
        for name, res in part["results"].items():
            merged.setdefault(name, {}).update(res["variants"])
    all_results = {name: {"variants": {v: d[v] for v in VARIANTS if v in d}} for name, d in merged.items()}
    for name in all_results:
        write_report(all_results, meta, args, name)
    print(to_markdown(all_results, meta))


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive whole number of epochs, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number of epochs, got {value}")
    return value


def _or(value, before):
    """A setting of an older result file: ``before`` (train()'s default then) where it was not recorded."""
    return before if value is None else value


def _resolve_scheduler_defaults(args) -> None:
    """--scheduler-patience / --scheduler-factor left out: train()'s defaults, written into args so that the
    report and sessions.json carry the values used (and a --run-dir is not continued under changed defaults)."""
    from cartlorem.config import Config  # its defaults are train()'s

    defaults = Config()
    for k in ("scheduler_patience", "scheduler_factor"):
        if getattr(args, k, None) is None:
            setattr(args, k, getattr(defaults, k))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_argument(p)
    p.add_argument("--sets", default="dimers")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma list of none, lorem, multipole, mace")
    p.add_argument("--skip-mace", action="store_true")
    p.add_argument("--epochs", type=int, default=0, help="training epochs per model (0: as many as --budget allows)")
    p.add_argument("--budget", type=float, default=None,
                   help="training wall-clock seconds per model (default: 240 without --epochs, none with it)")
    p.add_argument("--patience", type=_positive_int, default=None, metavar="P",
                   help="early stopping: stop a model after P epochs without a better validation loss "
                        "(default: off); with --epochs 0 (the default) epochs are unlimited up to --budget")
    p.add_argument("--scheduler-patience", type=_positive_int, default=None, metavar="P",
                   help="ReduceLROnPlateau: cut the learning rate after P epochs without a better validation loss "
                        "(default: train()'s, as cartlorem train; for every model, MACE included)")
    p.add_argument("--scheduler-factor", type=float, default=None, metavar="F",
                   help="ReduceLROnPlateau: multiply the learning rate by F on a plateau (default: train()'s)")
    add_training_arguments(p)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--placement", choices=["before_last", "end"], default=None,
                   help="where the long-range models run their block (long_range_options placement; default: the "
                        "model's default, end)")
    p.add_argument("--charge-channels", default=None, metavar="K",
                   help="how many of the long-range block's channels carry charges (long_range_options "
                        "charge_channels: an integer, or 'all'; default: the model's default)")
    p.add_argument("--end-features", choices=["full", "light"], default=None,
                   help="with the block at the end, how the last layer makes its rank-1/2 features (long_range_options "
                        "end_features: full, as every layer; light, its message and a skip shared by the species; "
                        "default: the model's, full)")
    p.add_argument("--compile", action="store_true",
                   help="train the cartlorem models with train(compile=True) (cartlorem train --compile: the same "
                        "numbers to rounding, 2.5-3.3x less CPU per step after minutes of compilation; MACE trains "
                        "eagerly); recorded per session in sessions.json")
    p.add_argument("--run-dir", default=None,
                   help="train each model in RUN_DIR/<set>/<variant> and continue it from its checkpoint there if an "
                        "earlier run left one (a study spread over sessions: --budget is per session, the report "
                        "adds the sessions up; the settings must not change)")
    p.add_argument("--quick", action="store_true", help="smoke test: 20 s budget, 120 frames")
    p.add_argument("--out", default=str(HERE / "results" / "accuracy"))
    p.add_argument("--combine", nargs="+", metavar="JSON",
                   help="write --out from the results of runs made in parallel (e.g. one model each on its own "
                        "core), side by side; nothing is trained")
    p.add_argument("--peer-worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    _resolve_scheduler_defaults(args)
    if args.combine:
        combine(args.combine, args)
        return

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
    if not variants or not set(variants) <= set(VARIANTS):
        p.error(f"--variants: a comma list of {', '.join(VARIANTS)} (got {args.variants!r})")
    if args.skip_mace and "mace" in variants:
        variants.remove("mace")
    meta = {**machine_info(), **{k: v for k, v in vars(args).items() if k != "peer_worker"},
            "command": command_line("accuracy.py", argv)}
    args.commit = meta.get("git_commit")
    if math.isinf(meta["budget"]):
        meta["budget"] = None  # no wall-clock limit (strict JSON has no Infinity)
    python, missing = peer_python()
    if python is not None:
        r = subprocess.run([python, "-c", "from importlib.metadata import version as v; import e3nn; "
                            "print(v('mace-torch'), 'e3nn', e3nn.__version__)"], capture_output=True, text=True,
                           env=dict(os.environ, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1"))
        meta["mace"] = r.stdout.strip().splitlines()[-1] if r.returncode == 0 and r.stdout.strip() else MACE_MISSING
    else:
        meta["mace"] = missing
    all_results = {}
    for name in [s.strip() for s in args.sets.split(",") if s.strip()]:
        all_results[name] = {"variants": {}}
        for v in variants:
            print(f"[{name}] training {LABEL[v]} for " + (f"{args.epochs} epochs" if args.epochs else f"{args.budget:g} s")
                  + (f" (patience {args.patience})" if args.patience else "") + " ...", flush=True)
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
                      f"meV/atom  F MAE {t['forces_mae_mev_per_a']:.1f} meV/Å  ({res['train_seconds']:.0f} s, "
                      f"stop: {res.get('stop_reason')}, best epoch {res.get('best_epoch')})", flush=True)
            else:
                print(f"[{name}] {LABEL[v]}: {res.get('status')}", flush=True)
            write_report(all_results, meta, args, name)
    print(to_markdown(all_results, meta))


if __name__ == "__main__":
    main()
