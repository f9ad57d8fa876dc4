"""Side-by-side test errors of accuracy.py runs that differ in one setting, seed by seed.

Each ``--runs LABEL=GLOB`` names a setting and the accuracy.py result files (json) of its seeds; runs are
paired by seed (each seed has its own split and initial weights, so only same-seed differences are
meaningful) and summarised as mean ± standard deviation over seeds of: test energy and force MAE, the
per-atom force MAE beyond 8 Å and, on dimers, the net intermolecular force beyond 8 Å.

Runs capped by wall-clock time reach different epochs, so their test errors at the cap mix the settings' speed
with how well they learn. ``--epochs`` adds the validation errors at equal epochs (from each run's learning
curve), seed by seed, with each setting's ratio to the first one (geometric mean over the seeds that reached the
epoch); ``--below`` adds the first epoch at which the validation energy MAE fell below each given value (meV/atom:
e.g. when a cumulene model left the short-range floor of ~20 meV/atom). ``LABEL=GLOB@VARIANT`` compares another model
variant (``lorem`` against ``multipole``, say) than ``--variant``.

    python benchmarks/compare_runs.py --set dimers --variant multipole \\
        --runs before_last='benchmarks/results/placement/acc_before_last_s*.json' \\
               end='benchmarks/results/placement/acc_end_s*.json' --out benchmarks/results/placement
    python benchmarks/compare_runs.py --set cumulene --epochs 50 100 200 400 --below 10 2 \\
        --runs full='benchmarks/results/end_features.full.cumulene.seed*.json' \\
               light='benchmarks/results/end_features.light.cumulene.seed*.json' --out /tmp/cmp
"""

from __future__ import annotations

import argparse
import glob
import json
import math
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
        if set_name not in d.get("results", {}):
            sets = ", ".join(d.get("results", {})) or "none"
            raise SystemExit(f"{path} has no results on {set_name!r} (it has {sets}); choose it with --set")
        found = d["results"][set_name]["variants"]
        if variant not in found:
            raise SystemExit(f"{path} has no {variant!r} results on {set_name} (it has {', '.join(found)})")
        out[d["meta"]["seed"]] = (found[variant], d["meta"])
    if not out:
        raise SystemExit(f"no accuracy.py results match {pattern!r}")
    return out


def value(metric, result):
    try:
        return metric(result)
    except KeyError:
        return None


def commits(runs, seeds) -> str:
    """'commit X' or 'commits X (seeds …), Y (seeds …)': the git commits the paired runs were made on."""
    by_commit = {}
    for r in runs.values():
        for s in seeds:
            meta = r[s][1]
            name = str(meta.get("git_commit"))[:10] + (", dirty tree" if meta.get("git_dirty") else "")
            by_commit.setdefault(name, set()).add(s)
    if len(by_commit) == 1:
        return f"commit {next(iter(by_commit))}"
    return "commits " + ", ".join(f"{c} (seeds {', '.join(map(str, sorted(v)))})" for c, v in by_commit.items())


def budget_text(runs, seeds, first) -> str:
    """The training budget of the paired runs: epochs, or the wall-clock cap and, where a run was spread over
    sessions (accuracy.py --run-dir: the cap is per session), the training wall time of the sessions added up."""
    if first.get("epochs"):
        return f"{first['epochs']} epochs"
    results = [r[s][0] for r in runs.values() for s in seeds]
    walls = [x["train_seconds"] for x in results if x.get("train_seconds") is not None]
    sessions = max((len(x.get("sessions") or ()) for x in results), default=0)
    spread = f"{min(walls):.0f}–{max(walls):.0f} s" if walls and round(min(walls)) != round(max(walls)) \
        else f"{walls[0]:.0f} s" if walls else "?"
    if sessions > 1:
        cap = f"a cap of {first['budget']:g} s per session" if first.get("budget") else "no wall-clock cap"
        return (f"{cap}, up to {sessions} sessions: {spread} of training wall clock per run in all "
                "(the sessions added up)")
    if first.get("budget"):
        return f"a cap of {first['budget']:g} s of training wall clock per run ({spread} used)"
    return f"no wall-clock cap ({spread} of training wall clock per run)"


def at_epoch(result, epoch):
    """(validation energy MAE, force MAE) of ``result``'s learning curve at ``epoch``; None where it has none."""
    for row in result.get("history", ()):
        if row["epoch"] == epoch:
            return row["valid_energy_mae_mev_per_atom"], row["valid_forces_mae_mev_per_a"]
    return None


def first_below(result, threshold):
    """The first epoch whose validation energy MAE is below ``threshold`` (meV/atom), or None."""
    for row in result.get("history", ()):
        if row["valid_energy_mae_mev_per_atom"] < threshold:
            return row["epoch"]
    return None


def equal_epoch_lines(runs, seeds, epochs, summary):
    """Markdown rows of the validation errors at equal epochs (and their ratios to the first setting); fills
    ``summary[label]["valid at epoch"]``."""
    labels = list(runs)
    lines = ["", "Validation MAE at equal epochs, energy (meV/atom) / force (meV/Å), seed by seed; ratio: the "
             f"setting's over `{labels[0]}`'s, geometric mean over the seeds that reached the epoch "
             "(— where a run stopped before it).", "",
             "| epoch | " + " | ".join(f"{label}, seed {s}" for label in labels for s in seeds)
             + "".join(f" | ratio {label}" for label in labels[1:]) + " |",
             "|---|" + "---|" * (len(labels) * len(seeds) + len(labels) - 1)]
    for epoch in epochs:
        values = {label: [at_epoch(runs[label][s][0], epoch) for s in seeds] for label in labels}
        cells = [("—" if v is None else f"{v[0]:.2f} / {v[1]:.1f}") for label in labels for v in values[label]]
        for label in labels:
            summary.setdefault(label, {}).setdefault("valid at epoch", {})[str(epoch)] = values[label]
        for label in labels[1:]:
            pairs = [(a, b) for a, b in zip(values[labels[0]], values[label]) if a is not None and b is not None]
            if not pairs:
                cells.append("—")
                continue
            ratio = [math.exp(statistics.fmean(math.log(b[k] / a[k]) for a, b in pairs)) for k in (0, 1)]
            cells.append(f"{ratio[0]:.2f} / {ratio[1]:.2f} ({len(pairs)})")
        lines.append(f"| {epoch} | " + " | ".join(cells) + " |")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", default="dimers")
    p.add_argument("--variant", default="multipole")
    p.add_argument("--runs", nargs="+", required=True, metavar="LABEL=GLOB[@VARIANT]",
                   help="a setting's result files; @VARIANT: that setting's model variant, if not --variant")
    p.add_argument("--epochs", nargs="*", type=int, default=[],
                   help="also compare the validation errors at these epochs (equal epochs, seed by seed)")
    p.add_argument("--below", nargs="*", type=float, default=[],
                   help="also report the first epoch with a validation energy MAE below each value (meV/atom)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    runs, variants = {}, {}
    for item in args.runs:
        label, _, pattern = item.partition("=")
        head, at, tail = pattern.rpartition("@")
        if at and tail and "/" not in tail:  # GLOB@VARIANT (an "@" inside a path is left to the glob)
            pattern = head
        variants[label] = tail if at and tail and "/" not in tail else args.variant
        runs[label] = load(pattern, args.set, variants[label])
    seeds = sorted(set.intersection(*(set(r) for r in runs.values())))
    if not seeds:  # runs are compared seed by seed: nothing to pair
        raise SystemExit("no seed is common to all the runs (" + "; ".join(
            f"{label}: seeds {', '.join(map(str, sorted(r)))}" for label, r in runs.items()) + ")")
    summary, lines = {}, []
    first = next(iter(runs.values()))[seeds[0]][1]
    made_on = commits(runs, seeds)
    kinds = sorted(set(variants.values()))
    title = f"`{kinds[0]}`: " + " vs ".join(runs) if len(kinds) == 1 else " vs ".join(
        f"{label} (`{variants[label]}`)" for label in runs)
    lines += [f"# {args.set}, {title}", "",
              f"Command: `{harness.command_line('compare_runs.py', argv, prefix='python')}`", "",
              f"accuracy.py runs on {made_on} ({first.get('cpu_model')}), "
              + budget_text(runs, seeds, first) + f", C = {first.get('channels')}, {first.get('dtype')}, seeds "
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
    for threshold in args.below:
        cells = []
        for label, r in runs.items():
            reached = [first_below(r[s][0], threshold) for s in seeds]
            summary.setdefault(label, {})[f"first epoch below {threshold:g}"] = reached
            cells.append(", ".join("never" if e is None else str(e) for e in reached))
        lines.append(f"| first epoch with validation energy below {threshold:g} meV/atom (per seed) | "
                     + " | ".join(cells) + " |")
    if args.epochs:
        lines += equal_epoch_lines(runs, seeds, args.epochs, summary)
    Path(args.out + ".json").write_text(json.dumps({"seeds": seeds, "runs": list(runs), "variants": variants,
                                                    "summary": summary,
                                                    "commit": first.get("git_commit"), "commits": made_on}, indent=1))
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
