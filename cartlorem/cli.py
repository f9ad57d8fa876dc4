"""Command line: ``cartlorem train | evaluate | demo``.

    cartlorem train --train TRAIN.xyz [--valid VALID.xyz] [--config CONFIG.yaml] --out RUN_DIR
                    [--epochs N] [--device cpu|cuda] [--long-range multipole|lorem|none] [--seed S] ...
    cartlorem evaluate --model RUN_DIR/model.pt --data TEST.xyz [--json METRICS.json]
    cartlorem demo [--out DIR] [--epochs N]

Every ``train`` option is also a key of the YAML config (``--batch-size`` ↔ ``batch_size``);
flags given on the command line override the config, and the complete set of values used,
defaults included, is written to ``RUN_DIR/config.yaml`` (which ``--config`` accepts back).
User errors print ``error: …`` and exit with status 2; a diverged training exits with 1.
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

__all__ = ["main"]


class CLIError(Exception):
    """A user error: printed as ``error: …`` (no traceback), exit status 2."""


# --------------------------------------------------------------------------------------------------
# value converters (used for flags and for config values alike)


def _conv(name: str):
    def deco(fn):
        fn.__name__ = name  # argparse names the converter in "invalid <name> value"
        return fn

    return deco


@_conv("float")
def _float(v) -> float:
    if isinstance(v, bool):
        raise argparse.ArgumentTypeError(f"expected a number, got {v!r}")
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a number, got {v!r}") from None
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {v!r}")
    return x


@_conv("int")
def _int(v) -> int:
    if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
        raise argparse.ArgumentTypeError(f"expected an integer, got {v!r}")
    try:
        return int(v)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected an integer, got {v!r}") from None


@_conv("bool")
def _bool(v) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("true", "yes", "on", "1"):
        return True
    if s in ("false", "no", "off", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {v!r}")


@_conv("text")
def _str(v) -> str:
    if not isinstance(v, (str, int, float)) or isinstance(v, bool):
        raise argparse.ArgumentTypeError(f"expected text, got {v!r}")
    return str(v)


@_conv("path")
def _path(v) -> str:
    return str(Path(_str(v)).expanduser())


@_conv("species")
def _species(v) -> list[int]:
    from ase.data import atomic_numbers

    items = v.replace(",", " ").split() if isinstance(v, str) else v
    if not isinstance(items, (list, tuple)) or not items:
        raise argparse.ArgumentTypeError(f"expected elements such as H,O,Na,Cl, got {v!r}")
    out = set()
    for s in items:
        if isinstance(s, int) and not isinstance(s, bool) and 1 <= s <= 118:
            out.add(s)
        elif isinstance(s, str) and s.strip() in atomic_numbers:
            out.add(atomic_numbers[s.strip()])
        elif isinstance(s, str) and s.strip().isdigit() and 1 <= int(s) <= 118:
            out.add(int(s))
        else:
            raise argparse.ArgumentTypeError(f"unknown element {s!r}")
    return sorted(out)


@_conv("mapping")
def _mapping(v) -> dict:
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError(f"expected a mapping (key: value entries), got {v!r}")
    return dict(v)


def _nullable(conv: Callable) -> Callable:
    def fn(v):
        if v is None or (isinstance(v, str) and v.strip().lower() in ("none", "null", "")):
            return None
        return conv(v)

    fn.__name__ = conv.__name__
    return fn


def _choice(*choices: str) -> Callable:
    def fn(v):
        s = "none" if v is None else _str(v).lower()
        if s not in choices:
            raise argparse.ArgumentTypeError(f"expected one of {', '.join(choices)}, got {v!r}")
        return s

    fn.__name__ = "choice"
    fn.choices = choices
    return fn


def _label_key(v) -> Optional[str]:
    s = _str(v) if v is not None else "none"
    return None if s.lower() == "none" else s


_label_key.__name__ = "key"


# --------------------------------------------------------------------------------------------------
# the option table of `cartlorem train`: one source for flags, config keys, defaults and help


@dataclass(frozen=True)
class _Opt:
    name: str  # config key; the flag is --name-with-dashes
    conv: Callable
    default: Any
    help: str
    group: str
    flag: bool = True  # False: config file only


def _defaults_of(fn) -> dict:
    return {
        k: p.default
        for k, p in inspect.signature(fn).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def _train_options() -> list[_Opt]:
    from .model import CartLorem
    from .train import DEFAULT_WEIGHTS, train

    M, T = _defaults_of(CartLorem.__init__), _defaults_of(train)
    lr_default = M["long_range"] if M["long_range"] is not None else "none"
    key_help = (
        "'calc' (ASE single-point results), an atoms.info/arrays key such as REF_{0}, or 'none' to ignore"
    )
    # fmt: off
    return [
        _Opt("train", _path, None, "training set (extxyz or any ASE-readable file) [required]", "data"),
        _Opt("valid", _nullable(_path), None,
             "validation set (default: --valid-fraction of the training set)", "data"),
        _Opt("valid_fraction", _float, 0.1, "fraction of the training set held out when --valid is not given",
             "data"),
        _Opt("energy_key", _label_key, "calc", key_help.format("energy"), "data"),
        _Opt("forces_key", _label_key, "calc", key_help.format("forces"), "data"),
        _Opt("stress_key", _label_key, "calc", key_help.format("stress") + " (used where present)", "data"),
        _Opt("species", _nullable(_species), None,
             "elements the model knows, e.g. H,O,Na,Cl (default: all in the data)", "data"),
        _Opt("cutoff", _float, M["cutoff"], "local cutoff in Å", "model"),
        _Opt("long_range", _choice("multipole", "lorem", "none"), lr_default, "long-range block", "model"),
        _Opt("channels", _int, M["channels"], "features per rank", "model"),
        _Opt("num_layers", _int, M["num_layers"], "interaction layers", "model"),
        _Opt("correlation", _int, M["correlation"], "body order of the products", "model"),
        _Opt("lmax", _int, M["lmax"], "highest feature rank (0, 1 or 2)", "model"),
        _Opt("num_basis", _int, M["num_basis"], "Bessel radial basis functions", "model"),
        _Opt("radial_hidden", _int, M["radial_hidden"], "width of the radial MLP", "model"),
        _Opt("readout_hidden", _int, M["readout_hidden"], "width of the last readout MLP", "model"),
        _Opt("envelope_p", _int, M["envelope_p"], "polynomial envelope exponent", "model"),
        _Opt("long_range_options", _nullable(_mapping), None, "options of the long-range block (config only)",
             "model", flag=False),
        _Opt("epochs", _int, T["epochs"], "total number of epochs", "training"),
        _Opt("batch_size", _int, T["batch_size"], "structures per training batch", "training"),
        _Opt("valid_batch_size", _nullable(_int), T["valid_batch_size"],
             "structures per validation batch (default: 2 × batch size)", "training"),
        _Opt("lr", _float, T["lr"], "initial learning rate", "training"),
        _Opt("energy_weight", _float, DEFAULT_WEIGHTS["energy"], "loss weight of the energy per atom",
             "training"),
        _Opt("forces_weight", _float, DEFAULT_WEIGHTS["forces"], "loss weight of the forces", "training"),
        _Opt("stress_weight", _float, DEFAULT_WEIGHTS["stress"], "loss weight of the stress", "training"),
        _Opt("optimizer", _choice("adam", "amsgrad"), T["optimizer"], "optimiser", "training"),
        _Opt("weight_decay", _float, T["weight_decay"], "weight decay", "training"),
        _Opt("ema_decay", _nullable(_float), T["ema_decay"], "decay of the weight average (0 or none: off)",
             "training"),
        _Opt("scheduler_factor", _float, T["scheduler_factor"], "learning-rate factor on a plateau",
             "training"),
        _Opt("scheduler_patience", _int, T["scheduler_patience"],
             "epochs without improvement before the learning rate drops", "training"),
        _Opt("clip_grad", _nullable(_float), T["clip_grad"], "maximum gradient norm (none: no clipping)",
             "training"),
        _Opt("patience", _nullable(_int), T["patience"],
             "early stopping after this many epochs without a better validation loss (none: never)",
             "training"),
        _Opt("max_time", _nullable(_float), T["max_time"], "wall-clock budget of the training in seconds",
             "training"),
        _Opt("seed", _int, T["seed"], "random seed (initial weights, split, batch order)", "training"),
        _Opt("out", _path, None, "output folder (model.pt, checkpoint.pt, config.yaml, log.csv) [required]",
             "run"),
        _Opt("device", _str, "cpu", "cpu or cuda (falls back to the CPU when CUDA is absent)", "run"),
        _Opt("threads", _nullable(_int), None,
             "CPU threads for torch (default: torch's choice; 1 is often fastest for small models)", "run"),
        _Opt("dtype", _choice("float32", "float64"), "float64", "floating-point precision", "run"),
        _Opt("resume", _bool, T["resume"], "continue the run in --out from its checkpoint", "run"),
        _Opt("overwrite", _bool, T["overwrite"], "start afresh even if --out holds a run", "run"),
        _Opt("progress", _bool, T["progress"], "progress bars and per-epoch lines", "run"),
    ]
    # fmt: on


_GROUP_TITLES = {"data": "data", "model": "model", "training": "training", "run": "run"}


def _add_train_flags(p: argparse.ArgumentParser, options: list[_Opt]) -> None:
    groups = {g: p.add_argument_group(t) for g, t in _GROUP_TITLES.items()}
    groups["run"].add_argument(
        "--config",
        type=_path,
        metavar="CONFIG.yaml",
        help="YAML file whose keys are the options below (flags override it)",
    )
    for o in options:
        if not o.flag:
            continue
        flag = "--" + o.name.replace("_", "-")
        g = groups[o.group]
        if o.conv is _bool:
            if o.default:
                g.add_argument(
                    "--no-" + o.name.replace("_", "-"), dest=o.name, action="store_false", help=o.help
                )
            else:
                g.add_argument(flag, dest=o.name, action="store_true", help=o.help)
            continue
        shown = "none" if o.default is None else o.default
        metavar = {
            "path": "FILE",
            "int": "N",
            "float": "X",
            "species": "ELEMENTS",
            "key": "KEY",
            "text": o.name.upper(),
        }.get(o.conv.__name__)
        if o.name == "out":
            metavar = "RUN_DIR"
        help_text = (
            o.help if ("[required]" in o.help or "(default" in o.help) else f"{o.help} (default: {shown})"
        )
        kwargs = dict(dest=o.name, type=o.conv, help=help_text, metavar=metavar)
        if hasattr(o.conv, "choices"):
            kwargs.update(choices=list(o.conv.choices), metavar=None)
        g.add_argument(flag, **kwargs)


def _read_config(path: str, options: list[_Opt]) -> dict:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise CLIError(f"config file {path!r} does not exist")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise CLIError(f"config file {path!r} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise CLIError(f"config file {path!r} must hold 'key: value' entries, got a {type(raw).__name__}")
    by_name = {o.name: o for o in options}
    out = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in by_name:
            close = difflib.get_close_matches(name, list(by_name), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise CLIError(
                f"config file {path!r}: unknown key {key!r}{hint}; valid keys: {', '.join(by_name)}"
            )
        try:
            out[name] = by_name[name].conv(value)
        except argparse.ArgumentTypeError as err:
            raise CLIError(f"config file {path!r}: key {key!r}: {err}") from None
    return out


def _resolve_train_options(args: argparse.Namespace, options: list[_Opt]) -> dict:
    """defaults ← RUN_DIR/config.yaml (on --resume without --config) ← --config ← flags."""
    given = {o.name: getattr(args, o.name) for o in options if hasattr(args, o.name)}
    values = {o.name: o.default for o in options}
    config = getattr(args, "config", None)
    if config is None and given.get("resume") and given.get("out"):
        previous = Path(given["out"]) / "config.yaml"
        if previous.is_file():
            config = str(previous)
    if config is not None:
        values.update(_read_config(config, options))
    values.update(given)
    for name in ("train", "out"):
        if not values.get(name):
            raise CLIError(
                f"no {'training set' if name == 'train' else 'output folder'}: pass --{name} "
                f"or set '{name}' in the config"
            )
    checks = [
        ("epochs", lambda v: v >= 0, ">= 0"),
        ("batch_size", lambda v: v >= 1, ">= 1"),
        ("lr", lambda v: v > 0, "> 0"),
        ("cutoff", lambda v: v > 0, "> 0"),
        ("channels", lambda v: v >= 1, ">= 1"),
        ("valid_fraction", lambda v: 0 <= v < 1, "in [0, 1)"),
        ("max_time", lambda v: v is None or v > 0, "> 0"),
    ]
    for name, ok, what in checks:
        if not ok(values[name]):
            raise CLIError(f"{name} must be {what}, got {values[name]}")
    return values


# --------------------------------------------------------------------------------------------------
# shared helpers


def _device(name: str) -> str:
    import torch

    name = name.strip().lower()
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            print("note: CUDA is not available on this machine; running on the CPU", file=sys.stderr)
            return "cpu"
        return name
    if name != "cpu":
        raise CLIError(f"device must be cpu or cuda, got {name!r}")
    return name


def _threads(n: Optional[int]) -> None:
    import torch

    if n is not None:
        if n < 1:
            raise CLIError(f"threads must be >= 1, got {n}")
        torch.set_num_threads(n)


def _symbols(species) -> list[str]:
    from ase.data import chemical_symbols

    return [chemical_symbols[int(z)] for z in species]


def _write_yaml(path: Path, values: dict, header: str) -> None:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + yaml.safe_dump(values, sort_keys=False, allow_unicode=True))


def _print_summary(result, out: Optional[Path]) -> None:
    from .train import metric_summary

    print(
        f"stopped after epoch {result.epochs_completed} ({result.stop_reason.replace('_', ' ')}); best epoch "
        f"{result.best_epoch}: {metric_summary(result.best_metrics)} (validation)"
    )
    if out is not None:
        print(f"model: {out / 'model.pt'}   log: {out / 'log.csv'}")


# --------------------------------------------------------------------------------------------------
# cartlorem train


def _read(path, cutoff, keys, require, dtype):
    """read_dataset, with command-line wording for a missing label."""
    from .data import read_dataset

    try:
        return read_dataset(path, cutoff, **keys, require=require, dtype=dtype)
    except ValueError as err:
        if "label" in str(err) and "require" in str(err):
            raise CLIError(
                f"{err} (on the command line: --energy-key / --forces-key KEY, or 'none' to train "
                "without that label)"
            ) from None
        raise


def _cmd_train(args: argparse.Namespace) -> int:
    import torch

    from .data import split
    from .model import CartLorem
    from .train import CHECKPOINT, train

    options = _train_options()
    v = _resolve_train_options(args, options)
    out = Path(v["out"])
    for name in ("train", "valid"):
        if v[name] is not None and not Path(v[name]).is_file():
            raise CLIError(f"{name} file {v[name]!r} does not exist")
    if not v["resume"] and (out / CHECKPOINT).exists() and not v["overwrite"]:
        raise CLIError(
            f"{out} already holds a training run; pass --resume to continue it or --overwrite to start "
            "afresh"
        )
    if v["resume"] and not (out / CHECKPOINT).exists():
        raise CLIError(f"cannot resume: no {CHECKPOINT} in {out}")
    device = _device(v["device"])
    _threads(v["threads"])
    dtype = getattr(torch, v["dtype"])
    keys = {"energy_key": v["energy_key"], "forces_key": v["forces_key"], "stress_key": v["stress_key"]}
    require = tuple(n for n in ("energy", "forces") if keys[f"{n}_key"])
    if not require:
        raise CLIError("energy_key and forces_key are both 'none': there is nothing to train on")

    t0 = time.perf_counter()
    graphs = _read(v["train"], v["cutoff"], keys, require, dtype)
    if v["valid"] is not None:
        train_graphs = graphs
        valid_graphs = _read(v["valid"], v["cutoff"], keys, require, dtype)
    elif v["valid_fraction"] > 0 and len(graphs) >= 2:
        tr, va = split(graphs, v["valid_fraction"], seed=v["seed"])
        train_graphs, valid_graphs = [graphs[k] for k in tr], [graphs[k] for k in va]
    else:
        train_graphs, valid_graphs = graphs, []
    present = sorted({int(z) for g in train_graphs + valid_graphs for z in g.species.unique().tolist()})
    species = v["species"] or present
    missing = sorted(set(present) - set(species))
    if missing:
        raise CLIError(
            f"the data contain {', '.join(_symbols(missing))}, which are not in species "
            f"{', '.join(_symbols(species))}"
        )
    v["species"] = _symbols(species)
    if v["progress"]:
        print(
            f"data: {len(train_graphs)} training and {len(valid_graphs)} validation structures "
            f"({', '.join(v['species'])}), read in {time.perf_counter() - t0:.1f} s",
            file=sys.stderr,
        )

    torch.manual_seed(v["seed"])
    try:
        model = CartLorem(
            species,
            cutoff=v["cutoff"],
            long_range=None if v["long_range"] == "none" else v["long_range"],
            channels=v["channels"],
            num_layers=v["num_layers"],
            correlation=v["correlation"],
            lmax=v["lmax"],
            num_basis=v["num_basis"],
            radial_hidden=v["radial_hidden"],
            readout_hidden=v["readout_hidden"],
            envelope_p=v["envelope_p"],
            long_range_options=v["long_range_options"],
        )
    except ImportError as err:
        raise CLIError(
            f"long_range={v['long_range']!r} is not available in this installation ({err})"
        ) from None
    model = model.to(device=device, dtype=dtype)

    config = dict(v, resume=False, overwrite=False)  # actions of this call, not settings of the run
    for name in ("train", "valid", "out"):  # absolute, so that the file works from any folder
        if config[name] is not None:
            config[name] = str(Path(config[name]).resolve())
    _write_yaml(
        out / "config.yaml",
        config,
        "# cartlorem train: every option of this run (defaults included); reuse with --config\n",
    )
    result = train(
        model,
        train_graphs,
        valid_graphs,
        epochs=v["epochs"],
        batch_size=v["batch_size"],
        lr=v["lr"],
        weights={"energy": v["energy_weight"], "forces": v["forces_weight"], "stress": v["stress_weight"]},
        optimizer=v["optimizer"],
        weight_decay=v["weight_decay"],
        ema_decay=v["ema_decay"],
        scheduler_factor=v["scheduler_factor"],
        scheduler_patience=v["scheduler_patience"],
        clip_grad=v["clip_grad"],
        patience=v["patience"],
        valid_batch_size=v["valid_batch_size"],
        out_dir=out,
        resume=v["resume"],
        overwrite=v["overwrite"],
        seed=v["seed"],
        progress=v["progress"],
        max_time=v["max_time"],
    )
    _print_summary(result, out)
    return 0


# --------------------------------------------------------------------------------------------------
# cartlorem evaluate


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import torch

    from .data import read_dataset
    from .evaluate import format_table, metrics, parity_plot, predict
    from .model import load_model

    if not Path(args.model).is_file():
        raise CLIError(f"model file {args.model!r} does not exist")
    if not Path(args.data).is_file():
        raise CLIError(f"data file {args.data!r} does not exist")
    if args.batch_size < 1:
        raise CLIError(f"batch size must be >= 1, got {args.batch_size}")
    model = load_model(args.model)
    device = _device(args.device)
    _threads(args.threads)
    dtype = getattr(torch, args.dtype) if args.dtype else model.dtype
    model = model.to(device=device, dtype=dtype)
    graphs = read_dataset(
        args.data,
        model.cutoff,
        energy_key=args.energy_key,
        forces_key=args.forces_key,
        stress_key=args.stress_key,
        require=(),
        dtype=dtype,
    )
    preds = predict(model, graphs, batch_size=args.batch_size, progress=args.progress)
    m = metrics(preds)
    print(f"model {args.model} on {args.data}")
    print(format_table(m))
    if not (m["n_energy"] or m["n_forces"]):
        print(
            "note: the data carry no energy or force labels (check --energy-key / --forces-key)",
            file=sys.stderr,
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(m, indent=2) + "\n")
        print(f"metrics written to {args.json}")
    if args.predictions:
        preds.save(args.predictions)
        print(f"predictions written to {args.predictions}")
    if args.parity:
        if parity_plot(preds, args.parity):
            print(f"parity plot written to {args.parity}")
        else:
            print("note: matplotlib is not installed; no parity plot", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------------------------------
# cartlorem demo


def _demo_data_path(given: Optional[str]) -> Path:
    if given:
        p = Path(given)
        if not p.is_file():
            raise CLIError(f"data file {given!r} does not exist")
        return p
    try:
        from .datasets import demo_path

        p = Path(demo_path())
    except (ImportError, FileNotFoundError, OSError):
        p = Path(__file__).parent / "datasets" / "demo.xyz"
    if not p.is_file():
        raise CLIError(
            f"the bundled demo dataset is missing ({p}); reinstall cartlorem or pass --data FILE.xyz"
        )
    return p


def run_nve(
    atoms, *, steps: int, timestep_fs: float, temperature_K: float, seed: int, progress: bool
) -> dict:
    """NVE velocity-Verlet MD with the calculator attached to ``atoms``; energy-conservation summary.

    Velocities from a Maxwell–Boltzmann distribution at ``temperature_K`` (seeded), centre-of-mass
    motion and rotation removed. Returns times (fs), potential/kinetic/total energies (eV),
    temperatures (K), the drift of the total energy (slope of a linear fit, meV/atom/ps), the
    largest |E(t) − E(0)| (meV/atom and meV) and an error message if the run stopped early.
    """
    import numpy as np
    from ase import units
    from ase.md import velocitydistribution as vd
    from ase.md.verlet import VelocityVerlet

    from tqdm.auto import tqdm

    rng = np.random.default_rng(seed)
    if hasattr(vd, "thermalize_momenta"):  # ASE >= 3.29
        vd.thermalize_momenta(atoms, temperature_K, rng=rng)
    else:
        vd.MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_K, rng=rng)
    vd.Stationary(atoms)
    if not atoms.pbc.any():
        vd.ZeroRotation(atoms)
    dyn = VelocityVerlet(atoms, timestep=timestep_fs * units.fs)
    rec = {"time_fs": [], "epot": [], "ekin": [], "etot": [], "temperature": []}

    def record():
        epot, ekin = atoms.get_potential_energy(), atoms.get_kinetic_energy()
        rec["time_fs"].append(dyn.nsteps * timestep_fs)
        rec["epot"].append(epot)
        rec["ekin"].append(ekin)
        rec["etot"].append(epot + ekin)
        rec["temperature"].append(atoms.get_temperature())

    bar = tqdm(total=steps, desc="NVE MD", unit="step", disable=not progress, dynamic_ncols=True, leave=False)
    dyn.attach(record, interval=1)
    dyn.attach(lambda: bar.update(1) if dyn.nsteps > 0 else None, interval=1)
    error = None
    try:
        record()  # the initial state (ASE may call observers at step 0 too; duplicates are dropped below)
        dyn.run(steps)
    except ValueError as err:  # e.g. atoms that came too close for an untrained model
        error = f"MD stopped at step {dyn.nsteps}: {err}"
    finally:
        bar.close()
    rec = {k: np.asarray(v) for k, v in rec.items()}
    # the initial state may be recorded twice (explicitly and by the observer at step 0); keep one
    _, first = np.unique(rec["time_fs"], return_index=True)
    rec = {k: v[first] for k, v in rec.items()}
    n = len(atoms)
    e = rec["etot"] / n
    t_ps = rec["time_fs"] / 1000.0
    slope = float(np.polyfit(t_ps, e, 1)[0]) * 1000.0 if len(t_ps) > 2 else float("nan")
    dev = np.abs(rec["etot"] - rec["etot"][0])
    rec.update(
        drift_mev_per_atom_per_ps=slope,
        max_abs_de_mev_per_atom=float(dev.max() / n * 1000.0),
        max_abs_de_mev=float(dev.max() * 1000.0),
        steps_done=int(len(t_ps) - 1),
        error=error,
    )
    return rec


def _cmd_demo(args: argparse.Namespace) -> int:
    import ase.io
    import numpy as np
    import torch

    from .calculator import CartLoremCalculator
    from .data import read_dataset, split
    from .evaluate import format_table, metrics, parity_plot, predict
    from .model import CartLorem
    from .train import train

    t_start = time.perf_counter()
    path = _demo_data_path(args.data)
    out = Path(args.out)
    if args.epochs < 1 or args.md_steps < 1 or args.max_time <= 0:
        raise CLIError("--epochs, --md-steps and --max-time must be positive")
    device = _device(args.device)
    _threads(args.threads)
    long_range = None if args.long_range == "none" else args.long_range
    cutoff = 5.0
    dtype = torch.float32  # training and evaluation; the MD runs in float64

    print(f"[1/4] data: {path}")
    frames = ase.io.read(str(path), index=":")
    graphs = read_dataset(frames, cutoff, dtype=dtype)
    rest, test_idx = split(graphs, 0.1, seed=args.seed)
    tr, va = split(len(rest), 0.1, seed=args.seed + 1)
    train_idx, valid_idx = rest[tr], rest[va]
    species = sorted({int(z) for g in graphs for z in g.species.unique().tolist()})
    print(
        f"      {len(graphs)} structures ({', '.join(_symbols(species))}): {len(train_idx)} train, "
        f"{len(valid_idx)} validation, {len(test_idx)} test"
    )

    print(
        f"[2/4] training a small CartLorem (channels {args.channels}, 2 layers, correlation 2, "
        f"cutoff {cutoff} Å, long range {args.long_range}) for at most {args.epochs} epochs "
        f"or {args.max_time:g} s"
    )
    torch.manual_seed(args.seed)
    try:
        model = CartLorem(
            species,
            cutoff=cutoff,
            long_range=long_range,
            channels=args.channels,
            num_layers=2,
            correlation=2,
            radial_hidden=32,
        ).to(device=device, dtype=dtype)
    except ImportError as err:
        raise CLIError(
            f"long_range={args.long_range!r} is not available in this installation ({err})"
        ) from None
    t0 = time.perf_counter()
    result = train(
        model,
        [graphs[k] for k in train_idx],
        [graphs[k] for k in valid_idx],
        epochs=args.epochs,
        batch_size=4,
        lr=1e-2,
        ema_decay=0.99,
        scheduler_patience=3,
        patience=None,
        out_dir=out,
        overwrite=True,
        seed=args.seed,
        progress=args.progress,
        max_time=args.max_time,
    )
    t_train = time.perf_counter() - t0
    _print_summary(result, out)
    print(f"      training time {t_train:.0f} s")

    print(f"[3/4] accuracy on the {len(test_idx)} test structures")
    preds = predict(model, [graphs[k] for k in test_idx], batch_size=16)
    m = metrics(preds)
    print("      " + format_table(m).replace("\n", "\n      "))
    (out / "test_metrics.json").write_text(json.dumps(m, indent=2) + "\n")
    parity_plot(preds, out / "parity.png")

    # MD on the largest neutral test structure
    pick = max(
        test_idx, key=lambda k: (float(frames[k].info.get("total_charge", 0.0)) == 0.0, len(frames[k]), -k)
    )
    atoms = frames[int(pick)].copy()
    atoms.calc = CartLoremCalculator(model, device=device, dtype="float64")
    print(
        f"[4/4] NVE MD: {args.md_steps} steps × {args.timestep:g} fs from {args.temperature:g} K on "
        f"{atoms.get_chemical_formula()} ({len(atoms)} atoms, test structure {int(pick)}), float64"
    )
    t0 = time.perf_counter()
    md = run_nve(
        atoms,
        steps=args.md_steps,
        timestep_fs=args.timestep,
        temperature_K=args.temperature,
        seed=args.seed,
        progress=args.progress,
    )
    t_md = time.perf_counter() - t0
    with open(out / "md.csv", "w") as f:
        f.write("time_fs,epot_ev,ekin_ev,etot_ev,temperature_k\n")
        for row in zip(md["time_fs"], md["epot"], md["ekin"], md["etot"], md["temperature"]):
            f.write(",".join(f"{x:.8g}" for x in row) + "\n")
    if md["error"]:
        print(f"      {md['error']}")
    print(
        f"      {md['steps_done']} steps in {t_md:.1f} s "
        f"({1000 * t_md / max(md['steps_done'], 1):.0f} ms/step); "
        f"T {md['temperature'][0]:.0f} K at the start, mean {np.mean(md['temperature']):.0f} K"
    )
    print(
        f"      energy drift {md['drift_mev_per_atom_per_ps']:+.3f} meV/atom/ps; max |ΔE| "
        f"{md['max_abs_de_mev_per_atom']:.3f} meV/atom ({md['max_abs_de_mev']:.2f} meV)"
    )
    print(
        f"demo finished in {time.perf_counter() - t_start:.0f} s; files in {out}/ (model.pt, log.csv, "
        "learning_curve.png, test_metrics.json, parity.png, md.csv)"
    )
    return 0 if not md["error"] else 1


# --------------------------------------------------------------------------------------------------
# parser and entry point


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(
        prog="cartlorem",
        description="Interatomic potentials on irreducible Cartesian "
        "tensors: train, evaluate, or run the demo.",
    )
    p.add_argument("--version", action="version", version=f"cartlorem {__version__}")
    sub = p.add_subparsers(dest="command", metavar="{train,evaluate,demo}")
    fmt = argparse.ArgumentDefaultsHelpFormatter

    t = sub.add_parser(
        "train",
        help="train a model on an extxyz dataset",
        argument_default=argparse.SUPPRESS,
        description="Train a CartLorem model. Every option is also a key of the YAML --config "
        "(dashes become underscores); flags override the config, and all values used are written to "
        "RUN_DIR/config.yaml. Writes RUN_DIR/model.pt (best EMA weights), checkpoint.pt, log.csv and "
        "learning_curve.png.",
    )
    _add_train_flags(t, _train_options())
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser(
        "evaluate",
        help="accuracy of a model on a labelled dataset",
        formatter_class=fmt,
        description="Energy (meV/atom), force (meV/Å) and, where labelled, stress (meV/Å³) MAE and RMSE "
        "of a model on a dataset.",
    )
    e.add_argument(
        "--model", required=True, metavar="MODEL.pt", help="model file (save_model / cartlorem train)"
    )
    e.add_argument("--data", required=True, metavar="TEST.xyz", help="labelled structures (extxyz)")
    e.add_argument("--json", metavar="METRICS.json", help="also write the metrics as JSON")
    e.add_argument("--predictions", metavar="PRED.npz", help="also write per-structure predictions (npz)")
    e.add_argument("--parity", metavar="PARITY.png", help="also write energy/force parity plots")
    e.add_argument("--batch-size", type=_int, default=16, help="structures per batch")
    e.add_argument(
        "--energy-key", type=_label_key, default="calc", help="energy label: 'calc', an info key or 'none'"
    )
    e.add_argument(
        "--forces-key", type=_label_key, default="calc", help="forces label: 'calc', an arrays key or 'none'"
    )
    e.add_argument(
        "--stress-key", type=_label_key, default="calc", help="stress label: 'calc', an info key or 'none'"
    )
    e.add_argument("--device", default="cpu", help="cpu or cuda")
    e.add_argument(
        "--dtype", choices=["float32", "float64"], default=None, help="precision (default: the model's)"
    )
    e.add_argument(
        "--threads", type=_int, default=None, help="CPU threads for torch (default: torch's choice)"
    )
    e.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    e.set_defaults(func=_cmd_evaluate)

    d = sub.add_parser(
        "demo",
        help="train, evaluate and run MD on the bundled demo data (a few minutes on a CPU)",
        formatter_class=fmt,
        description="Train a small model on the bundled GFN2-xTB clusters (train/validation/test "
        "split), report test accuracy, and run NVE molecular dynamics with the ASE calculator, "
        "printing the energy drift.",
    )
    d.add_argument("--out", default="cartlorem_demo_run", metavar="DIR", help="output folder (overwritten)")
    d.add_argument("--epochs", type=_int, default=20, help="training epochs")
    d.add_argument(
        "--max-time",
        type=_float,
        default=110.0,
        metavar="SECONDS",
        help="training time budget (a safety net on slow machines)",
    )
    d.add_argument("--channels", type=_int, default=16, help="features per rank")
    d.add_argument(
        "--long-range", choices=["multipole", "lorem", "none"], default="none", help="long-range block"
    )
    d.add_argument("--md-steps", type=_int, default=400, help="NVE MD steps")
    d.add_argument("--timestep", type=_float, default=0.5, metavar="FS", help="MD time step in fs")
    d.add_argument("--temperature", type=_float, default=300.0, metavar="K", help="initial temperature")
    d.add_argument("--seed", type=_int, default=0, help="random seed")
    d.add_argument("--device", default="cpu", help="cpu or cuda")
    d.add_argument(
        "--threads", type=_int, default=1, help="CPU threads for torch (one is fastest for this small model)"
    )
    d.add_argument("--data", metavar="FILE.xyz", help="use this dataset instead of the bundled one")
    d.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    d.set_defaults(func=_cmd_demo)
    return p


def main(argv=None) -> int:
    """Entry point of the ``cartlorem`` console script; returns the exit status."""
    from .train import NonFiniteLossError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error argparse has already printed
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.func(args)
    except (
        CLIError,
        ValueError,
        FileNotFoundError,
        FileExistsError,
        IsADirectoryError,
        NotADirectoryError,
        PermissionError,
    ) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; a training run continues with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
