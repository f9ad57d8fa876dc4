"""Side-by-side test errors of accuracy.py runs that differ in one setting, seed by seed.

Each ``--runs LABEL=GLOB`` names a setting and the accuracy.py result files (json) of its seeds; runs are
paired by seed (each seed has its own split and initial weights, so only same-seed differences are
meaningful) and summarised as mean ± standard deviation over seeds of: test energy and force MAE, the
per-atom force MAE beyond 8 Å and, on dimers, the net intermolecular force beyond 8 Å.

    python benchmarks/compare_runs.py --set dimers --variant multipole \\
        --runs before_last='benchmarks/results/placement/acc_before_last_s*.json' \\
               end='benchmarks/results/placement/acc_end_s*.json' --out benchmarks/results/placement
"""

from __future__ import annotations

import argparse
import glob
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

METRICS = (("energy MAE (meV/atom)", lambda r: r["test"]["energy_mae_mev_per_atom"]),
           ("force MAE (meV/Å)", lambda r: r["test"]["forces_mae_mev_per_a"]),
           ("force MAE beyond 8 Å", lambda r: r["groups"]["sep>=8"]["forces_mae_mev_per_a"]),
           ("intermolecular force beyond 8 Å", lambda r: r["intermolecular"]["sep>=8"]["intermolecular_force_mae_mev_per_a"]),
           ("training CPU s per epoch", lambda r: r["cpu_seconds_per_epoch"]),
           ("epochs trained", lambda r: float(r["epochs"])))


def load(pattern, set_name, variant):
    """{seed: (result of ``variant`` on ``set_name``, meta)} of the accuracy.py json files matching pattern."""
    out = {}
    for path in sorted(glob.glob(pattern)):
        d = json.loads(Path(path).read_text())
        out[d["meta"]["seed"]] = (d["results"][set_name]["variants"][variant], d["meta"])
    if not out:
        raise SystemExit(f"no accuracy.py results match {pattern!r}")
    return out


def value(metric, result):
    try:
        return metric(result)
    except KeyError:
        return None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", default="dimers")
    p.add_argument("--variant", default="multipole")
    p.add_argument("--runs", nargs="+", required=True, metavar="LABEL=GLOB")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    runs = {}
    for item in args.runs:
        label, _, pattern = item.partition("=")
        runs[label] = load(pattern, args.set, args.variant)
    seeds = sorted(set.intersection(*(set(r) for r in runs.values())))
    summary, lines = {}, []
    first = next(iter(runs.values()))[seeds[0]][1]
    lines += [f"# {args.set}, `{args.variant}`: " + " vs ".join(runs), "",
              f"Command: `{harness.command_line('compare_runs.py', argv, prefix='python')}`", "",
              f"accuracy.py runs on commit {first.get('git_commit')} ({first.get('cpu_model')}), "
              + (f"{first.get('epochs')} epochs" if first.get("epochs") else f"{first.get('budget'):g} s of training "
                 "wall clock each") + f", C = {first.get('channels')}, {first.get('dtype')}, seeds "
              f"{', '.join(map(str, seeds))}; each seed has its own split and initial weights, paired across settings. "
              "Test-set MAE, mean ± standard deviation over seeds (per seed in brackets).", "",
              "| metric | " + " | ".join(runs) + " |", "|---|" + "---|" * len(runs)]
    for name, metric in METRICS:
        cells = []
        for label, r in runs.items():
            vals = [value(metric, r[s][0]) for s in seeds]
            if any(v is None for v in vals):
                cells.append("—")
                continue
            mean = statistics.fmean(vals)
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            summary.setdefault(label, {})[name] = {"mean": mean, "std": sd, "per_seed": vals}
            cells.append(f"{mean:.2f} ± {sd:.2f} ({', '.join(f'{v:.2f}' for v in vals)})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    Path(args.out + ".json").write_text(json.dumps({"seeds": seeds, "runs": list(runs), "summary": summary,
                                                    "commit": first.get("git_commit")}, indent=1))
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
