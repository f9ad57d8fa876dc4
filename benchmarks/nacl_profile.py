"""The Na9Cl8+ / Na8Cl8+ distinction: how a far-away Na changes the energy profile of a moving Na.

In nacl.xyz one Na (``moving_atom``) is pulled out of the cluster along a line (``displacement`` d,
-0.6 … 2.5 Å); Na8Cl8+ lacks a Na 8–10.5 Å away from it that Na9Cl8+ has. The energy of each cluster
along d, E_c(d), is a profile plus rattle noise (about 100 meV per frame). The far Na shows up in
the *difference of the two profiles*

    D(d) = [E_Na9(d) − E_Na9(0)] − [E_Na8(d) − E_Na8(0)],

which grows to about 70 meV at d = 2.4 Å in the xTB reference. The per-frame energy MAE (≈ 1
meV/atom ≈ 17 meV per frame for every model) does not show whether a model gets D right: it is
dominated by the local rattle energy. Here each cluster's E(d) is fitted by a cubic polynomial on the
test frames (reference and predictions alike, so the rattle noise cancels in the error), and the
error of D is reported: its RMS over d ∈ [-0.5, 2.4] Å and at d = 2.4 Å, with the spread over 200
bootstrap resamples of the test frames.

Sources (the same test split as long_range.py / accuracy.py):

* ``--accuracy FILE.json ...``: the test predictions stored by accuracy.py (cartlorem and MACE);
* ``--models benchmarks/results/long_range_models``: the nacl_*.pt models saved by long_range.py (not committed: run long_range.py first to score them too).

    python benchmarks/nacl_profile.py     # writes benchmarks/results/nacl_profile.{md,json,png}
    python benchmarks/nacl_profile.py --seed 1 --accuracy benchmarks/results/accuracy.sn2_nacl.seed1.json \
        --models none --out benchmarks/results/nacl_profile.seed1     # a second split and initialisation
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

CLUSTERS = ("Na9Cl8+", "Na8Cl8+")
GRID = np.linspace(-0.5, 2.4, 30)  # Å, inside the sampled -0.6 … 2.5
DEGREE = 3
N_BOOTSTRAP = 200


def profile_difference(d, cluster, energy, grid=GRID, degree=DEGREE) -> np.ndarray:
    """D(grid) in eV from per-frame energies: cluster-wise polynomial fits of E(d), zeroed at d = 0."""
    prof = {}
    for c in CLUSTERS:
        m = cluster == c
        if m.sum() <= degree + 1:
            raise ValueError(f"{int(m.sum())} test frames of {c}: too few to fit a degree-{degree} profile")
        p = np.polyfit(d[m], energy[m], degree)
        prof[c] = np.polyval(p, grid) - np.polyval(p, 0.0)
    return prof[CLUSTERS[0]] - prof[CLUSTERS[1]]


def score(d, cluster, e_pred, e_ref, seed=0) -> dict:
    """Predicted vs reference D; the error's RMS and end value with bootstrap spreads (meV)."""
    d_ref = profile_difference(d, cluster, e_ref)
    d_pred = profile_difference(d, cluster, e_pred)
    err = (d_pred - d_ref) * 1000.0
    rng = np.random.default_rng(seed)
    rms_b, end_b = [], []
    for _ in range(N_BOOTSTRAP):
        k = rng.integers(0, len(d), len(d))
        eb = (profile_difference(d[k], cluster[k], e_pred[k]) - profile_difference(d[k], cluster[k], e_ref[k])) * 1e3
        rms_b.append(np.sqrt(np.mean(eb ** 2)))
        end_b.append(eb[-1])
    return {"D_ref_mev": (d_ref * 1000.0).tolist(), "D_pred_mev": (d_pred * 1000.0).tolist(),
            "rms_error_mev": float(np.sqrt(np.mean(err ** 2))), "rms_error_std_mev": float(np.std(rms_b)),
            "end_error_mev": float(err[-1]), "end_error_std_mev": float(np.std(end_b))}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_argument(p)
    p.add_argument("--accuracy", nargs="*", default=[str(HERE / "results" / "accuracy.sn2_nacl.json"),
                                                     str(HERE / "results" / "accuracy.nacl_lr0.02.json")])
    p.add_argument("--models", default=str(HERE / "results" / "long_range_models"))
    p.add_argument("--out", default=str(HERE / "results" / "nacl_profile"))
    p.add_argument("--seed", type=int, default=0, help="the split seed of the runs being scored (accuracy.py --seed)")
    args = p.parse_args(argv)
    split_args = argparse.Namespace(data_dir=args.data_dir, max_frames=0, cutoff=5.0, test_fraction=0.2, seed=args.seed)
    frames, graphs, species, train_idx, valid_idx, test_idx = load_split("nacl", split_args)
    test = [frames[k] for k in test_idx]
    d = np.array([float(a.info["displacement"]) for a in test])
    cluster = np.array([str(a.info["cluster"]) for a in test])
    e_ref = np.array([a.get_potential_energy() for a in test])

    results = {}
    for fn in args.accuracy:
        if not Path(fn).exists():
            continue
        acc = json.loads(Path(fn).read_text())
        lr = acc.get("meta", {}).get("lr")
        n_atoms = np.array([len(a) for a in test])
        for v, x in acc.get("results", {}).get("nacl", {}).get("variants", {}).items():
            if "parity" not in x:
                continue
            ref = np.array(x["parity"]["energy_ref"])  # eV/atom (accuracy.parity_arrays)
            if ref.shape != e_ref.shape or not np.allclose(ref * n_atoms, e_ref, atol=1e-5):
                raise ValueError(f"{fn}: its nacl test frames are not this split's")
            e_pred = np.array(x["parity"]["energy_pred"]) * n_atoms
            name = "MACE" if v == "mace" else f"cartlorem {v}"
            label = f"accuracy.py {Path(fn).stem.removeprefix('accuracy.')}: {name} ({x.get('epochs')} epochs" + \
                    (f", lr {lr:g})" if lr else ")")
            results[label] = score(d, cluster, e_pred, e_ref)
    if Path(args.models).is_dir():
        import cartlorem
        from cartlorem.evaluate import predict

        for v in ("none", "lorem", "multipole"):
            path = Path(args.models) / f"nacl_{v}.pt"
            if path.exists():
                pred = predict(cartlorem.load_model(path), [graphs[k] for k in test_idx], batch_size=16)
                r = score(d, cluster, pred.energy_pred, e_ref)
                same = [k for k, x in results.items() if np.allclose(x["D_pred_mev"], r["D_pred_mev"], atol=0.05)]
                if same:  # the saved model made those predictions: one row, say so
                    results[same[0]]["also"] = f"= long_range.py saved model nacl_{v}.pt"
                else:
                    results[f"long_range.py: cartlorem {v} (saved model)"] = r
    if not results:
        p.error("nothing to score: no nacl predictions in --accuracy and no nacl_*.pt in --models")

    d_ref = next(iter(results.values()))["D_ref_mev"]
    meta = {**machine_info(), "command": command_line("nacl_profile.py", argv), "grid": GRID.tolist(),
            "degree": DEGREE, "n_bootstrap": N_BOOTSTRAP, "sources": args.accuracy, "models": args.models,
            "seed": args.seed, "data_dir": args.data_dir}
    marks = [0, 10, 20, 29]
    lines = ["# Na9Cl8+ vs Na8Cl8+: the far Na in the energy profile of the moving Na", "",
             f"D(d) = [E_Na9(d) − E_Na9(0)] − [E_Na8(d) − E_Na8(0)] from cubic fits of E(d) per cluster on the "
             f"{len(test)} test frames ({int((cluster == CLUSTERS[0]).sum())} Na9Cl8+, "
             f"{int((cluster == CLUSTERS[1]).sum())} Na8Cl8+). Reference (xTB) D at d = "
             + ", ".join(f"{GRID[i]:.1f}" for i in marks) + " Å: "
             + ", ".join(f"{d_ref[i]:.1f}" for i in marks) + " meV. Errors in meV, ± the bootstrap standard "
             f"deviation (200 resamples of the test frames). `{meta['command']}` ({meta['date']}, commit "
             f"{(meta.get('git_commit') or '?')[:10]}{', dirty tree' if meta.get('git_dirty') else ''}, "
             f"{meta['cpu_model']}, load {meta['loadavg_1min']}).", "",
             "| model | D predicted at " + ", ".join(f"{GRID[i]:.1f}" for i in marks)
             + " Å | RMS error of D | error of D at 2.4 Å |", "|---|---|---|---|"]
    for label, r in results.items():
        lines.append(f"| {label}{' (' + r['also'] + ')' if 'also' in r else ''} | " + ", ".join(f"{r['D_pred_mev'][i]:.1f}" for i in marks)
                     + f" | {r['rms_error_mev']:.1f} ± {r['rms_error_std_mev']:.1f}"
                     + f" | {r['end_error_mev']:+.1f} ± {r['end_error_std_mev']:.1f} |")
    Path(args.out + ".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return
    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(GRID, d_ref, color="k", lw=2.5, label="xTB reference")
    colours = {"none": "tab:blue", "lorem": "tab:orange", "multipole": "tab:green", "MACE": "tab:red"}
    for label, r in results.items():
        model = label.split(": ", 1)[1]
        key = next((k for k in colours if k in model), None)
        ax.plot(GRID, r["D_pred_mev"], lw=1.3, color=colours.get(key), ls="--" if "0.02" in model else "-",
                label=model)
    ax.set_xlabel("displacement d of the moving Na (Å)")
    ax.set_ylabel("D(d): Na9Cl8+ minus Na8Cl8+ profile (meV)")
    ax.legend(fontsize=6.5)
    fig.savefig(args.out + ".png", dpi=110)


if __name__ == "__main__":
    main()
