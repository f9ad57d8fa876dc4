"""Training-epoch time of ``cartlorem train`` per long-range model, the quantity issue 12 targets.

Runs the command line itself (``cartlorem train``, one process per run, fresh allocator) on the same
frames for each model: ``none``, ``multipole`` and ``lorem`` with the model's default block placement,
and ``KIND[end]`` for the block after the last layer (``long_range_options: {placement: end}`` in a
config file). Rounds alternate the models so that a drift in the machine's speed hits all alike; each
run trains ``--epochs`` epochs and the epoch times are read from its log.csv (``epoch_time_s``: the
training pass plus validation, wall clock). Reported: the median epoch time over all rounds and epochs
after the first epoch of each run (warm-up), and its ratio to ``none``.

    PYTHONPATH=$PWD python3 benchmarks/train_epoch.py --sets dimers,cumulene --models none,multipole,multipole[end],lorem \\
        --channels 16 --epochs 3 --rounds 2 --out benchmarks/results/train_epoch
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402


STDERR_LINES = 20  # of a failing training command, shown


def code_of(rev, workdir):
    """A folder holding the ``cartlorem`` package of git revision ``rev`` (to put first on PYTHONPATH)."""
    folder = Path(workdir) / f"code_{rev}"
    if not folder.is_dir():
        folder.mkdir()
        archive = subprocess.run(["git", "archive", rev, "cartlorem"], cwd=harness.REPO_ROOT, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def run_cli(data, model, args, workdir):
    """Train ``model`` on ``data``; epoch times (s). ``model``: "none", "multipole" or "lorem", optionally
    "[placement]", "+compile" (``--compile``) and "@REV" (the code of git revision REV)."""
    spec, _, rev = model.partition("@")
    spec, plus, _ = spec.partition("+compile")
    kind, _, placement = spec.partition("[")
    out = Path(workdir) / model.replace("[", "_").replace("]", "").replace("+", "_").replace("@", "_")
    code = code_of(rev, workdir) if rev else Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(code)] + [x for x in [os.environ.get("PYTHONPATH")] if x])}
    cmd = [sys.executable, "-m", "cartlorem.cli", "train", "--train", str(data), "--long-range", kind,
           "--channels", str(args.channels),
           "--correlation", str(args.correlation), "--epochs", str(args.epochs), "--dtype", args.dtype,
           "--threads", "1", "--seed", "0", "--out", str(out), "--overwrite", "--no-progress",
           "--batch-size", str(args.batch_size)]
    if placement:
        config = Path(workdir) / f"{out.name}.yaml"
        config.write_text(f"long_range_options:\n  placement: {placement.rstrip(']')}\n")
        cmd += ["--config", str(config)]
    if plus:
        cmd.append("--compile")
    r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=workdir)
    if r.returncode != 0:  # say why, with the end of the CLI's stderr (it went to /dev/null before)
        tail = "\n".join(r.stderr.strip().splitlines()[-STDERR_LINES:])
        raise SystemExit(f"train_epoch.py: training {model} failed (exit {r.returncode}): {' '.join(cmd)}\n{tail}")
    with open(out / "log.csv") as f:
        return [float(row["epoch_time_s"]) for row in csv.DictReader(f)]


def subset(name, args, workdir):
    """The first ``--frames`` frames of the data set, written to an extxyz in workdir."""
    from ase.io import read, write

    frames = read(harness.data_file(args.data_dir, name), f":{args.frames}")
    path = Path(workdir) / f"{name}.xyz"
    write(path, frames)
    return path, len(frames)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(harness.DEFAULT_DATA), metavar="DIR")
    p.add_argument("--sets", default="dimers,cumulene")
    p.add_argument("--models", default="none,multipole,multipole[end],lorem")
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--correlation", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--frames", type=int, default=400, help="frames of each set (10%% of them validate)")
    p.add_argument("--batch-size", type=int, default=8, help="structures per training batch (the CLI's default: 8)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "train_epoch"))
    args = p.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    # checked before any training: the first epoch of every run is dropped (warm-up), medians need an epoch left
    if args.epochs < 2:
        p.error(f"--epochs: at least 2 (the first epoch of each run is warm-up and not timed), got {args.epochs}")
    if args.rounds < 1:
        p.error(f"--rounds: at least 1, got {args.rounds}")
    if not models:
        p.error("--models: a comma list of models, got none")
    rows = []
    meta = harness.machine_info()
    with tempfile.TemporaryDirectory() as workdir:
        for name in [s.strip() for s in args.sets.split(",") if s.strip()]:
            data, n_frames = subset(name, args, workdir)
            times, firsts = {m: [] for m in models}, {m: [] for m in models}
            for r in range(args.rounds):
                for m in (models if r % 2 == 0 else models[::-1]):
                    epochs = run_cli(data, m, args, workdir)
                    firsts[m].append(epochs[0])
                    times[m] += epochs[1:]  # the first epoch of a run is warm-up (and, with +compile, compiles)
                    print(name, m, times[m], flush=True)
            base = statistics.median(times["none"]) if "none" in times else None
            for m in models:
                med = statistics.median(times[m])
                rows.append({"set": name, "frames": n_frames, "model": m, "epoch_s_median": round(med, 3),
                             "epoch_s": [round(t, 3) for t in times[m]],
                             "first_epoch_s": [round(t, 1) for t in firsts[m]],
                             "ratio_to_none": None if base is None else round(med / base, 3)})
    meta.update(settings=vars(args), loadavg_end=round(os.getloadavg()[0], 2),
                command=harness.command_line("train_epoch.py", argv))
    lines = ["# `cartlorem train` epoch time per long-range model", "", f"Command: `{meta['command']}`", "",
             f"Commit {meta['git_commit']} (dirty: {meta['git_dirty']}), {meta['date']}, {meta['cpu_model']}, torch "
             f"{meta['torch']}, 1 thread, {args.dtype}, C = {args.channels}, correlation {args.correlation}, batch "
             f"{args.batch_size}, "
             f"{args.frames} frames per set (90% train, 10% validation), {args.epochs} epochs per run × {args.rounds} "
             f"rounds, first epoch of each run dropped. Load average {meta['loadavg_1min']} at start, "
             f"{meta['loadavg_end']} at end (2 cores).", "",
             "Models: `+compile` trains with `--compile` (its first epoch compiles: the first-epoch column); "
             "`@REV` runs the code of git revision REV.", "",
             "| set | model | epoch median (s) | ÷ none | epochs timed | first epochs (s) |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['set']} | {r['model']} | {r['epoch_s_median']:.3f} | {r['ratio_to_none']} | "
                     f"{len(r['epoch_s'])} | {', '.join(str(t) for t in r['first_epoch_s'])} |")
    Path(args.out + ".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
