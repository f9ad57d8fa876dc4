"""Why the per-atom force error on distant dimers stays high: split it into a per-monomer uniform part and the rest.

Evaluates the two models saved by ``accuracy.py --run-dir runs/converged`` on the dimer test set (the split of
``harness.load_split`` with the settings in the runs' sessions.json) and, for all frames and the separation bins of
``harness.groups_for`` (< 5, 5–8, ≥ 8 Å), reports per model:

* the per-atom force MAE (meV/Å per component; ``harness.group_errors``, as accuracy.py reports it);
* that error split per monomer M (atoms a of M, n_M of them; A is the first ``info["monomer_a_atoms"]`` atoms):
  err_a = u_M + i_a with the uniform part u_M = (net force error of M) / n_M, the monomer's mean error per atom, and the
  internal part i_a = err_a − u_M, which sums to zero over M. MAE of each part, and the share of the squared error
  carried by the uniform part (exact: the two parts are orthogonal, so MSE = MSE_uniform + MSE_internal);
* the net (intermolecular) force MAE per monomer and component (``accuracy.intermolecular_errors``).

MACE needs benchmarks/.venv-peers (``setup_peers.sh``); when this interpreter cannot import mace the script runs itself
again under that venv's python (which imports cartlorem from this checkout).

    PYTHONPATH=$PWD python3 benchmarks/force_decomposition.py --out benchmarks/results/force_decomposition
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # the project: cartlorem and benchmarks

PEER_PYTHON = HERE / ".venv-peers" / "bin" / "python"  # as harness.PEER_PYTHON (not imported: torch not yet needed)
MODELS = {"multipole": "cartlorem multipole", "mace": "MACE"}
GROUPS = ["all", "sep<5", "5<=sep<8", "sep>=8"]
SPLIT_KEYS = ("data_dir", "cutoff", "test_fraction", "seed", "max_frames")


def load_settings(run_dir: Path) -> dict:
    """The training settings of both runs (sessions.json); they must agree on the data and the split."""
    settings = {v: json.loads((run_dir / v / "sessions.json").read_text())["settings"] for v in MODELS}
    a, b = settings["multipole"], settings["mace"]
    differ = [k for k in SPLIT_KEYS if a.get(k) != b.get(k)]
    if differ:
        raise SystemExit(f"the two runs used different data or split settings: {differ}")
    return settings


def load_mace(folder: Path, s: dict, species, train_graphs):
    """The MACE of accuracy.py (statistics from the training set, as run_variant builds it) with model.pt's weights."""
    import torch

    from benchmarks.harness import mace_for_training_set

    model = mace_for_training_set(species, train_graphs, int(s["channels"]), float(s["cutoff"]),
                                  int(s["correlation"]), getattr(torch, s["dtype"]))
    saved = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(saved["state_dict"])
    return model.eval()


def decompose(frames, pred):
    """Per-atom force error [N, 3] (meV/Å), its uniform part (monomer mean error per atom) and internal part."""
    from benchmarks.intermolecular import monomer_net_forces

    err = (pred.forces_pred - pred.forces_ref) * 1000.0
    net = monomer_net_forces(frames, err).reshape(-1, 3)  # [2 M, 3]: A, B of each frame
    n_a = np.array([int(a.info["monomer_a_atoms"]) for a in frames])
    counts = np.stack([n_a, np.array([len(a) for a in frames]) - n_a], axis=1).ravel()  # atoms of A, B per frame
    uniform = np.repeat(net / counts[:, None], counts, axis=0)
    return err, uniform, err - uniform


def rows_for(name, frames, pred, masks) -> list:
    from benchmarks.accuracy import intermolecular_errors
    from benchmarks.harness import group_errors

    err, uniform, internal = decompose(frames, pred)
    per_atom = group_errors(pred, masks)
    inter = intermolecular_errors(pred, frames, masks)
    rows = []
    for g in GROUPS:
        atoms = masks[g][pred.structure]
        e, u, i = err[atoms], uniform[atoms], internal[atoms]
        mse = float(np.mean(e ** 2))
        rows.append({"model": name, "group": g, "frames": int(masks[g].sum()), "atoms": int(atoms.sum()),
                     "forces_mae_mev_per_a": per_atom[g]["forces_mae_mev_per_a"],
                     "internal_mae_mev_per_a": float(np.abs(i).mean()),
                     "uniform_mae_mev_per_a": float(np.abs(u).mean()),
                     "forces_rmse_mev_per_a": mse ** 0.5,
                     "internal_rmse_mev_per_a": float(np.mean(i ** 2)) ** 0.5,
                     "uniform_rmse_mev_per_a": float(np.mean(u ** 2)) ** 0.5,
                     "uniform_share_of_mse": float(np.mean(u ** 2)) / mse,
                     "net_force_mae_mev_per_a": inter[g]["intermolecular_force_mae_mev_per_a"],
                     "net_force_ref_mean_abs_mev_per_a": inter[g]["intermolecular_force_ref_mean_abs_mev_per_a"]})
    return rows


def to_markdown(rows, meta) -> str:
    lines = [f"# Force error decomposition on the dimer test set ({meta['date']}, commit {meta['git_commit']}"
             f"{', dirty tree' if meta.get('git_dirty') else ''})", "", f"Command: `{meta['command']}`", "",
             f"Models: `{meta['run_dir']}/{{multipole,mace}}/model.pt` (best-validation weights); split: "
             f"harness.load_split, seed {meta['settings']['seed']}, test fraction {meta['settings']['test_fraction']}; "
             f"torch {meta['torch']}, 1 thread. Per component, meV/Å. uniform = monomer's mean error per atom "
             "(net force error / n_M), internal = per-atom error − uniform; MSE share = MSE_uniform / MSE (the parts "
             "are orthogonal); net = net force on each monomer (accuracy.py's intermolecular force).", "",
             "| model | group | frames | atoms | per-atom F MAE | internal MAE | uniform MAE | per-atom F RMSE "
             "| uniform share of MSE | net force MAE | net force ref mean abs |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {MODELS[r['model']]} | {r['group']} | {r['frames']} | {r['atoms']} | "
                     f"{r['forces_mae_mev_per_a']:.1f} | {r['internal_mae_mev_per_a']:.1f} | "
                     f"{r['uniform_mae_mev_per_a']:.2f} | {r['forces_rmse_mev_per_a']:.1f} | "
                     f"{100 * r['uniform_share_of_mse']:.2f} % | {r['net_force_mae_mev_per_a']:.1f} | "
                     f"{r['net_force_ref_mean_abs_mev_per_a']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", default=str(ROOT / "runs" / "converged" / "dimers"),
                   help="folder holding multipole/ and mace/ (model.pt, sessions.json) of accuracy.py --run-dir")
    p.add_argument("--data-dir", default=None, help="folder of dimers.xyz (default: the runs' data_dir)")
    p.add_argument("--out", default=None, help="also write OUT.md and OUT.json")
    args = p.parse_args(argv)

    if importlib.util.find_spec("mace") is None:  # run again in the peers venv, which has mace and sees cartlorem
        if not PEER_PYTHON.exists() or os.environ.get("FORCE_DECOMPOSITION_PEER"):
            raise SystemExit("MACE is importable neither here nor in benchmarks/.venv-peers (setup_peers.sh)")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                   OMP_NUM_THREADS="1", FORCE_DECOMPOSITION_PEER="1",
                   TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1", PYTHONWARNINGS="ignore")  # as accuracy.py runs MACE
        argv = sys.argv[1:] if argv is None else list(argv)
        os.execve(str(PEER_PYTHON), [str(PEER_PYTHON), str(Path(__file__).resolve()), *argv], env)

    import torch

    torch.set_num_threads(1)
    import cartlorem
    from benchmarks.harness import command_line, groups_for, load_split, machine_info, write_json_md
    from cartlorem.evaluate import predict

    run_dir = Path(args.run_dir)
    settings = load_settings(run_dir)
    s = settings["multipole"]
    split_args = argparse.Namespace(data_dir=args.data_dir or s["data_dir"], cutoff=float(s["cutoff"]),
                                    test_fraction=float(s["test_fraction"]), seed=int(s["seed"]),
                                    max_frames=int(s["max_frames"]))
    frames, graphs, species, train_idx, _, test_idx = load_split("dimers", split_args)
    test_frames, test_graphs = [frames[k] for k in test_idx], [graphs[k] for k in test_idx]
    masks = groups_for("dimers", test_frames)

    rows = []
    for v in MODELS:
        if v == "mace":
            model = load_mace(run_dir / v, settings[v], species, [graphs[k] for k in train_idx])
        else:
            model = cartlorem.load_model(run_dir / v / "model.pt")
        pred = predict(model, test_graphs, batch_size=16)
        rows += rows_for(v, test_frames, pred, masks)

    meta = {**machine_info(), "command": command_line("force_decomposition.py", argv), "run_dir": str(run_dir),
            "settings": s, "n_test": len(test_idx)}
    markdown = to_markdown(rows, meta)
    print(markdown)
    if args.out:
        write_json_md(args.out, {"name": "force_decomposition", "meta": meta, "rows": rows}, markdown)


if __name__ == "__main__":
    main()
