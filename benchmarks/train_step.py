"""Cost of one training step (forward, backward of the force, backward of the loss) per long-range kind.

A training step with force labels is: energy forward → forces = −∂E/∂r (a backward with
``create_graph=True``) → loss → ``loss.backward()``, which differentiates the force graph again (the
double backward). This script times that step, exactly as ``cartlorem.training.loop`` runs it
(same model call, same ``weighted_loss``, same optimiser and gradient clipping), for the models
``none`` (short range only), ``multipole`` and ``lorem``, on fixed batches of the dimer and cumulene
sets (open-boundary molecules of 6–18 atoms), and breaks the time down:

* ``median_s``: median wall time of one step after warm-up, steps of all models interleaved (the
  load of a shared machine then hits every model alike, so their ratio holds);
* ``ratio_to_none``: the step time over the short-range model's, the quantity issue 12 targets (≤ 1.15);
* ``profile``: torch.profiler's top operators by self CPU time over a few steps, and the time spent
  inside ``batched_multipole_fields`` (forward ``lr_fields_fwd_s``; its share of the backward is not
  separable by the profiler, so ``lr_overhead_s`` = step(model) − step(none) is reported).

With ``--mace`` and the peers venv (``benchmarks/setup_peers.sh``), MACE at matched settings
(same channels, correlation, cutoff, 2 interactions) is timed in the peer interpreter on the same
batches and reported as another row.

Example (what benchmarks/results/train_step.md was made with)::

    PYTHONPATH=$PWD python3 benchmarks/train_step.py --channels 16 32 --threads 1 --repeats 15
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

KINDS = ("none", "multipole", "lorem")
#: Variants of the long-range sum, timed in the same run (the model is the same, only the code path differs):
#: "" this branch; "@ref": kernel derivatives op by op (RadialKernel.derivatives_autograd, the code before
#: issue 12); "+pairs": open molecules through cartlorem.ewald.direct.open_molecules_fields (the proposed
#: call-site switch in cartlorem/ewald/fields.py, applied here by patching fields._open_batched).
#: "/zero-fields": the long-range sum replaced by zero fields that still depend on the charges and positions
#: (the rest of the block, its backward and double backward unchanged): step(kind) − step(kind/zero-fields) is
#: the cost of the Ewald/direct sum, step(kind/zero-fields) − step(none) the cost of the rest of the block.
VARIANTS = ("", "@ref", "+pairs", "/zero-fields")


def _zero_fields(positions, batch, cell, pbc, charges=None, dipoles=None, quadrupoles=None, *, ranks=(0, 1, 2),
                 **_):
    """Stand-in for batched_multipole_fields: zeros of the right shapes, attached to the graph."""
    from cartlorem.ewald.fields import MultipoleFields

    z = charges * 0.0  # [N, C]
    return MultipoleFields(z if 0 in ranks else None,
                           z[..., None] * positions[:, None, :] if 1 in ranks else None,
                           z[..., None, None] * positions[:, None, :, None] * positions[:, None, None, :]
                           if 2 in ranks else None)


@contextlib.contextmanager
def variant(name):
    """Apply a long-range code-path variant (see VARIANTS) for the duration of one step."""
    import cartlorem.ewald.fields as fields
    from cartlorem.ewald.direct import open_molecules_fields
    from cartlorem.ewald.kernels import RadialKernel

    import cartlorem.nn.long_range as long_range

    saved = (RadialKernel.derivatives, fields._open_batched, long_range.batched_multipole_fields)
    if name.endswith("/zero-fields"):
        long_range.batched_multipole_fields = _zero_fields
    if name.endswith("@ref"):
        RadialKernel.derivatives = RadialKernel.derivatives_autograd
    if name.endswith("+pairs"):
        fields._open_batched = lambda *a, **k: fields.MultipoleFields(*open_molecules_fields(*a, **k))
    try:
        yield
    finally:
        RadialKernel.derivatives, fields._open_batched, long_range.batched_multipole_fields = saved


def make_batches(name, args, species_out=None):
    """The first ``n_batches`` training batches of the fixed split (seeded order), collated."""
    import numpy as np

    from cartlorem.graph import collate

    frames, graphs, species, train_idx, _, _ = harness.load_split(name, args)
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(train_idx)
    batches = [collate([graphs[k] for k in order[b * args.batch_size:(b + 1) * args.batch_size]])
               for b in range(args.n_batches)]
    stats_graphs = [graphs[k] for k in train_idx[:200]]
    return batches, species, stats_graphs


def build_model(kind, species, channels, args, stats_graphs):
    from cartlorem import CartLorem
    from cartlorem.training.prepare import fit_statistics

    torch.manual_seed(args.seed)
    model = CartLorem(species, cutoff=args.cutoff, long_range=None if kind == "none" else kind,
                      channels=channels, correlation=args.correlation)
    fit_statistics(model, stats_graphs)
    return model.to(getattr(torch, args.dtype))


def step_fn(model, batches, dtype, path=""):
    """A closure doing one training step on the next batch (cycling), as the training loop does."""
    from cartlorem.training.loss import weighted_loss

    weights = {"energy": 10.0, "forces": 1.0, "stress": 0.0}
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, amsgrad=True)
    params = [p for p in model.parameters() if p.requires_grad]
    batches = [b.to(dtype=dtype) for b in batches]
    state = {"k": 0}
    model.train()

    def step():
        batch = batches[state["k"] % len(batches)]
        state["k"] += 1
        with variant(path):
            pred = model(batch, compute_forces=True, compute_stress=False, create_graph=True)
            loss, _ = weighted_loss(pred, batch, weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        opt.step()

    return step


def profile_step(step, n_steps=4, top=12):
    """torch.profiler over ``n_steps`` steps: top ops by self CPU time, and the forward time in the
    long-range field sum (``record_function`` around ``batched_multipole_fields``)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n_steps):
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    ops = [{"op": e.key, "self_ms_per_step": round(e.self_cpu_time_total / 1e3 / n_steps, 3),
            "share": round(e.self_cpu_time_total / total, 3), "calls_per_step": e.count // n_steps}
           for e in rows]
    lr = [e for e in events if e.key == "lr_fields_fwd"]
    lr_fwd = lr[0].cpu_time_total / 1e6 / n_steps if lr else 0.0
    return {"top_ops": ops, "lr_fields_fwd_s": round(lr_fwd, 5),
            "profiled_total_s": round(total / 1e6 / n_steps, 5)}


def _label_lr_fields():
    """Wrap the long-range block's field call in a profiler label (benchmark-only, no behaviour change)."""
    import cartlorem.nn.long_range as lr

    original = lr.batched_multipole_fields

    def labelled(*a, **k):
        with torch.profiler.record_function("lr_fields_fwd"):
            return original(*a, **k)

    lr.batched_multipole_fields = labelled


def mace_step_time(name, channels, args):
    """Median MACE step time at matched settings, run in the peers venv (None, reason) if absent."""
    python, why = harness.peer_python()
    if python is None:
        return None, why
    cmd = [python, __file__, "--mace-child", name, "--channels", str(channels)] + _common_flags(args)
    env = dict(os.environ, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1", PYTHONPATH=str(harness.REPO_ROOT))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        return None, f"MACE child failed: {r.stderr.strip()[-400:]}"
    return json.loads(r.stdout.strip().splitlines()[-1]), None


def _common_flags(args):
    return ["--data-dir", str(args.data_dir), "--correlation", str(args.correlation), "--batch-size",
            str(args.batch_size), "--n-batches", str(args.n_batches), "--threads", str(args.threads),
            "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--dtype", args.dtype,
            "--seed", str(args.seed)]


def run_mace_child(args):
    torch.set_num_threads(args.threads)
    torch.set_default_dtype(getattr(torch, args.dtype))
    name, channels = args.mace_child, args.channels[0]
    batches, species, stats_graphs = make_batches(name, args)
    mace = harness.build_mace(species, channels=channels, cutoff=args.cutoff, correlation=args.correlation)
    model = harness.MaceModel(mace, species).to(getattr(torch, args.dtype))
    t = harness.time_fn(step_fn(model, batches, getattr(torch, args.dtype)), warmup=args.warmup,
                        repeats=args.repeats)
    print(json.dumps({"median_s": t["median"], "iqr_s": t["iqr"], "cpu_median_s": t["cpu_median"]}))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_data_argument(p)
    p.add_argument("--sets", nargs="+", default=["dimers", "cumulene"])
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    p.add_argument("--channels", nargs="+", type=int, default=[16, 32])
    p.add_argument("--correlation", type=int, default=2)
    p.add_argument("--cutoff", type=float, default=5.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--n-batches", type=int, default=6, help="distinct batches cycled through")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS,
                   help="long-range code paths to time ('' this branch, '@ref' op-by-op kernels, '+pairs' "
                        "pair-list sum for open molecules, '/zero-fields' zero fields: cost of the rest of the block)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=12, help="timed steps per model (interleaved)")
    p.add_argument("--profile-steps", type=int, default=4, help="steps under torch.profiler (0: none)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mace", action="store_true", help="also time MACE in the peers venv")
    p.add_argument("--out", default=None, help="output stem (default benchmarks/results/train_step)")
    p.add_argument("--mace-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.test_fraction, args.max_frames = 0.2, 0
    if args.mace_child:
        return run_mace_child(args)
    torch.set_num_threads(args.threads)
    _label_lr_fields()
    dtype = getattr(torch, args.dtype)
    rows = []
    t_start = time.perf_counter()
    for name in args.sets:
        batches, species, stats_graphs = make_batches(name, args)
        atoms = round(sum(int(b.positions.shape[0]) for b in batches) / len(batches), 1)
        for channels in args.channels:
            models = {k: build_model(k, species, channels, args, stats_graphs) for k in args.kinds}
            steps = {}
            for k in args.kinds:
                for v in ([""] if k == "none" else args.variants):
                    steps[k + v] = step_fn(models[k], batches, dtype, v)
            times = harness.time_fns(steps, warmup=args.warmup, repeats=args.repeats)
            base = times["none"] if "none" in times else None
            for kind in steps:
                t = times[kind]
                row = {"set": name, "channels": channels, "model": kind, "atoms_per_batch": atoms,
                       "median_s": round(t["median"], 5), "iqr_s": round(t["iqr"], 5),
                       "cpu_median_s": round(t["cpu_median"], 5)}
                if base is not None:
                    row["ratio_to_none"] = round(t["median"] / base["median"], 3)
                    row["cpu_ratio_to_none"] = round(t["cpu_median"] / base["cpu_median"], 3)
                    row["lr_overhead_s"] = round(t["median"] - base["median"], 5)
                if args.profile_steps and (kind in args.kinds):
                    row["profile"] = profile_step(steps[kind], args.profile_steps)
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "profile"}), flush=True)
            if args.mace:
                m, why = mace_step_time(name, channels, args)
                row = {"set": name, "channels": channels, "model": "mace", "atoms_per_batch": atoms}
                if m is None:
                    row["note"] = why
                else:
                    row.update(median_s=round(m["median_s"], 5), iqr_s=round(m["iqr_s"], 5),
                               cpu_median_s=round(m["cpu_median_s"], 5))
                    if base is not None:
                        row["ratio_to_none"] = round(m["median_s"] / base["median"], 3)
                        row["cpu_ratio_to_none"] = round(m["cpu_median_s"] / base["cpu_median"], 3)
                    for r in rows:
                        if r["set"] == name and r["channels"] == channels and "median_s" in r:
                            r["ratio_to_mace"] = round(r["median_s"] / m["median_s"], 3)
                            r["cpu_ratio_to_mace"] = round(r["cpu_median_s"] / m["cpu_median_s"], 3)
                rows.append(row)
                print(json.dumps(row), flush=True)
    meta = harness.machine_info()
    meta.update(command="PYTHONPATH=$PWD python3 " + " ".join([sys.argv[0]] + sys.argv[1:]),
                loadavg_end=round(os.getloadavg()[0], 2), wall_s=round(time.perf_counter() - t_start, 1),
                settings={k: v for k, v in vars(args).items() if k != "mace_child"})
    meta["settings"]["data_dir"] = str(meta["settings"]["data_dir"])
    harness.write_results("train_step", rows, meta, markdown=_markdown(rows, meta), out=args.out)


def _markdown(rows, meta):
    cols = [("set", "set"), ("C", "channels"), ("model", "model"), ("atoms/batch", "atoms_per_batch"),
            ("step median (s)", "median_s"), ("IQR (s)", "iqr_s"), ("÷ none", "ratio_to_none"),
            ("CPU median (s)", "cpu_median_s"), ("CPU ÷ none", "cpu_ratio_to_none"),
            ("÷ MACE", "ratio_to_mace"), ("CPU ÷ MACE", "cpu_ratio_to_mace"), ("LR fields fwd (s)", "lr_fwd")]
    table = [{**r, "lr_fwd": r.get("profile", {}).get("lr_fields_fwd_s"), "atoms_per_batch": round(r["atoms_per_batch"], 1)}
             for r in rows]
    lines = ["# One training step (energy + forces + loss backward) per long-range kind", "",
             f"Command: `{meta['command']}`", "",
             f"Commit {meta['git_commit']} (dirty: {meta['git_dirty']}), {meta['date']}, {meta['cpu_model']}, "
             f"torch {meta['torch']}, {meta['settings']['threads']} thread(s), {meta['settings']['dtype']}, "
             f"batch {meta['settings']['batch_size']} structures, correlation {meta['settings']['correlation']}. "
             f"Load average {meta['loadavg_1min']} at start, {meta['loadavg_end']} at end "
             f"({meta['cpu_count']} cores, shared with other jobs: absolute times are pessimistic, the "
             "interleaved ratios hold).", "", harness.markdown_table(table, cols), ""]
    by = {(r["set"], r["channels"], r["model"]): r for r in rows if "cpu_median_s" in r}
    notes = []
    for (name, c, model), r in by.items():
        base = by.get((name, c, "none"))
        if model in ("none", "mace") or base is None or not model.isalpha():
            continue
        over = r["cpu_median_s"] - base["cpu_median_s"]
        line = f"- {name}, C = {c}, {model}: long-range CPU overhead {over * 1e3:.0f} ms per step"
        ref = by.get((name, c, model + "@ref"))
        if ref is not None:
            line += f" (op-by-op kernels: {(ref['cpu_median_s'] - base['cpu_median_s']) * 1e3:.0f} ms)"
        nof = by.get((name, c, model + "/zero-fields"))
        if nof is not None:
            line += (f"; the field sum {(r['cpu_median_s'] - nof['cpu_median_s']) * 1e3:.0f} ms, the rest of the "
                     f"block (multipole maps, products, MLPs) {(nof['cpu_median_s'] - base['cpu_median_s']) * 1e3:.0f} ms")
        notes.append(line + f"; the local model (none) {base['cpu_median_s'] * 1e3:.0f} ms.")
    if notes:
        lines += ["## Where the long-range time goes (process CPU time, medians)", ""] + notes + [""]
    for r in rows:
        if "profile" not in r:
            continue
        lines += [f"## {r['set']}, C = {r['channels']}, {r['model']}: top ops by self CPU time", "",
                  harness.markdown_table(r["profile"]["top_ops"],
                                         [("op", "op"), ("self ms/step", "self_ms_per_step"),
                                          ("share", "share"), ("calls/step", "calls_per_step")]), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
