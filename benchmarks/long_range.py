"""Does long range help? Short-range vs "lorem" vs "multipole" on data with long-range physics.

Same 5 Å cutoff, same architecture, same seed, same split and the same training budget (`--epochs`, the same for every variant; an optional
wall-clock cap `--budget`) for the three variants.
Energy and force MAE overall and by group:

* dimers.xyz   by `classes` and by centre separation (< 5, 5–8, > 8 Å)
* nacl.xyz     by `cluster` (Na8Cl8+ vs Na9Cl8+; the distinction itself is scored by nacl_profile.py)
* sn2.xyz      by |xi| bins
* nacl_pbc.xyz overall (periodic Ewald path, stress)

    python benchmarks/long_range.py --sets dimers,nacl --epochs 12
    python benchmarks/long_range.py --quick          # smoke test: 1 epoch, 120 frames per set, no saved models

Writes benchmarks/results/long_range.json and .md (machine, versions and git commit stamped).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project: cartlorem and benchmarks
import cartlorem  # noqa: E402
from benchmarks.harness import (add_data_argument, add_training_arguments, command_line,  # noqa: E402
                                group_errors, groups_for, load_split, machine_info)
from cartlorem.evaluate import predict  # noqa: E402
from cartlorem.train import train  # noqa: E402

VARIANTS = [None, "lorem", "multipole"]


def evaluate_saved(name, args):
    """Score the models saved by an earlier (possibly interrupted) run on the same test split."""
    frames, graphs, species, train_idx, valid_idx, test_idx = load_split(name, args)
    masks = groups_for(name, [frames[k] for k in test_idx])
    results = {}
    for key in ("none", "lorem", "multipole"):
        path = Path(args.save_models) / f"{name}_{key}.pt"
        if not path.exists():
            continue
        model = cartlorem.load_model(path)
        pred = predict(model, [graphs[k] for k in test_idx], batch_size=16)
        results[key] = {"epochs": args.epochs, "train_seconds": None,
                        "n_parameters": sum(p.numel() for p in model.parameters()),
                        "groups": group_errors(pred, masks)}
    return {"n_train": len(train_idx), "n_valid": len(valid_idx), "n_test": len(test_idx), "variants": results}


def run_set(name, args):
    frames, graphs, species, train_idx, valid_idx, test_idx = load_split(name, args)
    test_frames = [frames[k] for k in test_idx]
    masks = groups_for(name, test_frames)
    results = {}
    for lr in VARIANTS:
        if (lr or "none") not in args.variants:
            continue
        torch.manual_seed(args.seed)
        model = cartlorem.CartLorem(species, cutoff=args.cutoff, long_range=lr, channels=args.channels,
                                    num_layers=2, correlation=args.correlation)
        model = model.to(getattr(torch, args.dtype))
        t0 = time.perf_counter()
        res = train(model, [graphs[k] for k in train_idx], [graphs[k] for k in valid_idx], epochs=args.epochs,
                    batch_size=args.batch_size, lr=args.lr, max_time=args.budget, patience=None,
                    seed=args.seed, progress=False, weights={"energy": args.energy_weight, "forces": 1.0})
        wall = time.perf_counter() - t0
        pred = predict(model, [graphs[k] for k in test_idx], batch_size=16)
        key = "none" if lr is None else lr
        if args.save_models:
            Path(args.save_models).mkdir(parents=True, exist_ok=True)
            cartlorem.save_model(model, Path(args.save_models) / f"{name}_{key}.pt")
        results[key] = {"epochs": int(res.epochs_completed), "train_seconds": wall,
                        "n_parameters": sum(p.numel() for p in model.parameters()),
                        "groups": group_errors(pred, masks)}
        g = results[key]["groups"]["all"]
        print(f"[{name}] {key:9s} epochs={results[key]['epochs']:4d} E MAE {g['energy_mae_mev_per_atom']:.2f} "
              f"meV/atom  F MAE {g['forces_mae_mev_per_a']:.1f} meV/Å  ({wall:.0f} s)", flush=True)
    return {"n_train": len(train_idx), "n_valid": len(valid_idx), "n_test": len(test_idx), "variants": results}


def to_markdown(all_results, meta) -> str:
    lines = [f"# Long range vs short range ({meta['date']}, commit {(meta.get('git_commit') or '?')[:10]}"
             f"{', dirty tree' if meta.get('git_dirty') else ''})", "",
             *([f"Command: `{meta['command']}`", ""] if meta.get("command") else []),
             f"Machine: {meta['cpu_model']} ({meta['torch_num_threads']} threads, load {meta['loadavg_1min']}). Budget "
             f"{meta['epochs']} epochs per model (wall cap {meta['budget_s']} s), channels {meta['channels']}, cutoff {meta['cutoff']} Å, "
             f"seed {meta['seed']}. Test-set MAE: energy meV/atom / forces meV/Å.", ""]
    for name, r in all_results.items():
        lines += [f"## {name} (train {r['n_train']}, valid {r['n_valid']}, test {r['n_test']})", "",
                  "| group | n | " + " | ".join(r["variants"]) + " |",
                  "|---|---|" + "---|" * len(r["variants"])]
        groups = list(next(iter(r["variants"].values()))["groups"])
        for g in groups:
            cells = []
            for v in r["variants"].values():
                x = v["groups"][g]
                cells.append(f"{x['energy_mae_mev_per_atom']:.2f} / {x['forces_mae_mev_per_a']:.1f}")
            n = next(iter(r["variants"].values()))["groups"][g]["n"]
            lines.append(f"| {g} | {n} | " + " | ".join(cells) + " |")
        lines.append("| epochs | | " + " | ".join(str(v["epochs"]) for v in r["variants"].values()) + " |")
        stamps = {(v.get("commit"), v.get("date")) for v in r["variants"].values()}
        if len(stamps) > 1:
            lines.append("\nTrained in separate runs: " + "; ".join(
                f"{k} at commit {v['commit']} ({v['date'][:16]}, load {v.get('loadavg_1min')})" if v.get("commit")
                else f"{k} in an earlier run (before per-variant stamps; its code path is unchanged since)"
                for k, v in r["variants"].items()) + ".")
        missing = [v for v in ("none", "lorem", "multipole") if v not in r["variants"]]
        left_out = [v for v in missing if "variants" in meta and v not in meta["variants"]]
        if left_out:
            lines.append(f"\nLeft out by --variants: {', '.join(left_out)}.")
        if len(left_out) < len(missing):
            lines.append(f"\nNot trained in this run (time): {', '.join(v for v in missing if v not in left_out)}.")
        lines.append("")
    return "\n".join(lines)


#: the settings a --merge must share with the results it joins (meta keys; budget_s is --budget)
SETTINGS = ("epochs", "budget_s", "channels", "cutoff", "seed", "dtype", "correlation", "batch_size", "lr",
            "energy_weight", "test_fraction", "max_frames", "data_dir")


def merge_mismatch(before: dict, now: dict) -> str:
    """The settings of ``now`` that differ from those recorded in ``before`` ('' if none), as text."""
    return "; ".join(f"{k}: {before[k]!r} before, {now[k]!r} now" for k in SETTINGS
                     if k in before and before[k] != now.get(k))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_argument(p)
    p.add_argument("--sets", default="dimers,nacl,sn2,nacl_pbc")
    p.add_argument("--epochs", type=int, default=12, help="training epochs per model (the budget)")
    p.add_argument("--budget", type=float, default=None, help="optional wall-clock cap in seconds per model")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core box)")
    add_training_arguments(p)
    p.add_argument("--save-models", default=str(Path(__file__).resolve().parent / "results" / "long_range_models"),
                   help="folder for the trained models ('' to skip)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 1 epoch (the --budget cap as given) on the first 120 frames of each set, "
                        "no models saved")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "long_range"))
    p.add_argument("--variants", default="none,lorem,multipole", help="comma list of none, lorem, multipole")
    p.add_argument("--merge", action="store_true",
                   help="keep the other sets and variants already in --out .json (same settings); replace only "
                        "what this run trains")
    p.add_argument("--report-only", action="store_true", help="rewrite the .md from the existing .json")
    p.add_argument("--evaluate-saved", action="store_true",
                   help="no training: score the models in --save-models on the same test split and merge "
                        "the sets into the existing .json (for runs that were interrupted)")
    args = p.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not set(args.variants) <= {"none", "lorem", "multipole"} or not args.variants:
        p.error(f"--variants: a comma list of none, lorem, multipole, got {args.variants}")
    if args.evaluate_saved:
        torch.set_num_threads(args.threads)
        saved = {"meta": {**machine_info(), "epochs": args.epochs, "budget_s": args.budget, "channels": args.channels,
                          "cutoff": args.cutoff, "seed": args.seed, "dtype": args.dtype}, "results": {}}
        if Path(args.out + ".json").exists():
            with open(args.out + ".json") as f:
                saved = json.load(f)
        for name in args.sets.split(","):
            saved["results"][name.strip()] = evaluate_saved(name.strip(), args)
        with open(args.out + ".json", "w") as f:
            json.dump(saved, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(to_markdown(saved["results"], saved["meta"]) + "\n")
        print(to_markdown(saved["results"], saved["meta"]))
        return
    if args.report_only:
        with open(args.out + ".json") as f:
            saved = json.load(f)
        for r in saved["results"].values():  # older runs labelled sn2 groups with '|', which breaks tables
            for v in r["variants"].values():
                v["groups"] = {k.replace("|xi|", "abs(xi)"): x for k, x in v["groups"].items()}
        with open(args.out + ".json", "w") as f:
            json.dump(saved, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(to_markdown(saved["results"], saved["meta"]) + "\n")
        return
    if args.quick:
        args.epochs, args.max_frames, args.save_models = 1, 120, ""
    torch.set_num_threads(args.threads)
    meta = {**machine_info(), "command": command_line("long_range.py", argv), "budget_s": args.budget,
            **{k: getattr(args, k) for k in SETTINGS if k != "budget_s"}, "variants": args.variants}
    all_results = {}
    if args.merge and Path(args.out + ".json").exists():
        with open(args.out + ".json") as f:
            before = json.load(f)
        mismatch = merge_mismatch(before["meta"], meta)
        if mismatch:
            raise SystemExit(f"--merge: {args.out}.json was made with other settings ({mismatch}); use the same "
                             "settings or another --out")
        all_results = before["results"]
        meta["merged"] = sorted(set(before["meta"].get("merged", []))
                                | {f"{s.strip()}:{v}" for s in args.sets.split(",") for v in args.variants})
    for name in args.sets.split(","):
        name = name.strip()
        new = run_set(name, args)
        for v in new["variants"].values():
            v.update(commit=(meta["git_commit"] or "?")[:10], date=meta["date"], loadavg_1min=meta["loadavg_1min"],
                     command=meta["command"])
        if name in all_results:
            all_results[name]["variants"].update(new["variants"])
            all_results[name]["variants"] = {k: all_results[name]["variants"][k]
                                             for k in ("none", "lorem", "multipole") if k in all_results[name]["variants"]}
        else:
            all_results[name] = new
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out + ".json", "w") as f:
            json.dump({"meta": meta, "results": all_results}, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(to_markdown(all_results, meta) + "\n")
    print(to_markdown(all_results, meta))


if __name__ == "__main__":
    main()
