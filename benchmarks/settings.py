"""Which learning rate and loss weights to make the defaults of ``cartlorem train`` (issue 12, item 4).

Every setting trains the same model on the same split with the same loop as ``accuracy.py`` (which
runs ``cartlorem.train.train``, the loop of the command line), for the same number of epochs, and is
scored on the test set. A setting is a learning rate and an energy : forces loss-weight ratio; the
grid is one factor at a time around the current defaults (``--lrs`` at ``--base-energy-weight``, then
``--energy-weights`` at ``--base-lr``), on each ``--sets`` data set.

The score of a setting on a set is the geometric mean of its energy MAE and force MAE, each divided by
the best value any setting reached on that set (1 = best at both); the settings are ranked by the mean
of their scores over the sets. ``accuracy.py`` writes the per-setting details (learning curves, groups)
next to the summary.

    PYTHONPATH=$PWD python3 benchmarks/settings.py --sets dimers,cumulene --epochs 20 --channels 16 \\
        --out benchmarks/results/settings

Writes <out>.json and <out>.md (machine, commit and command stamped) and <out>.runs/ (one accuracy.py
result per setting and set).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

HERE = Path(__file__).resolve().parent


def settings_grid(lrs, energy_weights, base_lr, base_weight):
    """(lr, energy weight) pairs, one factor at a time around (base_lr, base_weight), without repeats."""
    grid = [(lr, base_weight) for lr in lrs] + [(base_lr, w) for w in energy_weights]
    out = []
    for s in [(base_lr, base_weight)] + grid:
        if s not in out:
            out.append(s)
    return out


def scores(rows):
    """rows: {setting: {set: (energy MAE, force MAE)}} → {setting: mean over sets of the geometric mean of
    the MAEs relative to the best on that set}."""
    sets = sorted({name for r in rows.values() for name in r})
    best = {name: [min(r[name][k] for r in rows.values() if name in r) for k in (0, 1)] for name in sets}
    out = {}
    for setting, r in rows.items():
        per_set = [math.sqrt(r[n][0] / best[n][0] * r[n][1] / best[n][1]) for n in sets if n in r]
        out[setting] = sum(per_set) / len(per_set)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None, metavar="DIR")
    p.add_argument("--sets", default="dimers,cumulene")
    p.add_argument("--variant", default="multipole", choices=["none", "lorem", "multipole"])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--lrs", default="0.002,0.005,0.01")
    p.add_argument("--energy-weights", default="0.1,1,10", help="energy weight with forces weight 1")
    p.add_argument("--base-lr", type=float, default=5e-3)
    p.add_argument("--base-energy-weight", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(HERE / "results" / "settings"))
    args = p.parse_args(argv)
    floats = lambda text: [float(x) for x in text.split(",") if x.strip()]  # noqa: E731
    grid = settings_grid(floats(args.lrs), floats(args.energy_weights), args.base_lr, args.base_energy_weight)
    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    runs = Path(args.out + ".runs")
    runs.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in sets:
        for lr, w in grid:
            stem = runs / f"{name}.lr{lr:g}.ew{w:g}"
            if not Path(str(stem) + ".json").exists():  # a rerun continues where a stopped one ended
                cmd = [sys.executable, str(HERE / "accuracy.py"), "--sets", name, "--variants", args.variant,
                       "--skip-mace", "--epochs", str(args.epochs), "--channels", str(args.channels), "--lr", str(lr),
                       "--energy-weight", str(w), "--threads", str(args.threads), "--seed", str(args.seed),
                       "--out", str(stem)]
                if args.data_dir:
                    cmd += ["--data-dir", args.data_dir]
                print(" ".join(cmd), flush=True)
                subprocess.run(cmd, check=True)
            res = json.loads(Path(str(stem) + ".json").read_text())["results"][name]["variants"][args.variant]
            results.setdefault(f"lr {lr:g}, energy weight {w:g}", {})[name] = res
    rows = {s: {n: (r[n]["test"]["energy_mae_mev_per_atom"], r[n]["test"]["forces_mae_mev_per_a"]) for n in r}
            for s, r in results.items()}
    score = scores(rows)
    meta = harness.machine_info()
    meta.update(vars(args))
    meta["command"] = harness.command_line("settings.py", argv)
    summary = {s: {"score": score[s], **{n: {"energy_mae": e, "forces_mae": f,
                                              "epochs": results[s][n]["epochs"],
                                              "cpu_s": results[s][n]["train_cpu_seconds"]}
                                          for n, (e, f) in rows[s].items()}}
               for s in sorted(score, key=score.get)}
    Path(args.out + ".json").write_text(json.dumps({"meta": meta, "settings": summary}, indent=1))
    from cartlorem.config import Config  # train()'s defaults, which the accuracy.py runs of this study use

    defaults = Config()
    lines = [f"# Learning rate and loss weights for `cartlorem train` ({args.variant}, C = {args.channels}, "
             f"{args.epochs} epochs)", "",
             f"Command: `{meta['command']}`", "",
             f"Commit {meta.get('git_commit')} (dirty: {meta.get('git_dirty')}), {meta.get('cpu_model')}, "
             f"torch {meta.get('torch')}, {args.threads} thread(s), float32, seed {args.seed}. Forces weight 1; "
             "the other training rules as accuracy.py (AMSGrad, EMA 0.99, learning rate times "
             f"{defaults.scheduler_factor:g} after {defaults.scheduler_patience} epochs on a "
             "plateau, clipping 10, batch 8).", "",
             "Score: per set, the geometric mean of energy MAE and force MAE relative to the best setting's (1 = "
             "best at both), averaged over the sets; lower is better.", "",
             "| setting | score | " + " | ".join(f"{n} E MAE (meV/atom) | {n} F MAE (meV/Å)" for n in sets) + " |",
             "|---|---|" + "---|---|" * len(sets)]
    for s, r in summary.items():
        cells = " | ".join(f"{r[n]['energy_mae']:.2f} | {r[n]['forces_mae']:.1f}" if n in r else "— | —" for n in sets)
        lines.append(f"| {s} | {r['score']:.3f} | {cells} |")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
