"""Command line: ``cartlorem train | evaluate | demo | export`` — parse the arguments and dispatch.

    cartlorem train --train TRAIN.xyz [--valid VALID.xyz] [--config CONFIG.yaml] --out RUN_DIR
                    [--epochs N] [--device cpu|cuda] [--long-range multipole|lorem|none] [--seed S] ...
    cartlorem evaluate --model RUN_DIR/model.pt --data TEST.xyz [--json METRICS.json]
    cartlorem demo [--out DIR] [--epochs N]
    cartlorem export MODEL OUT [--metatomic] [--dtype float32|float64]

The ``train`` options are :data:`cartlorem.config.OPTIONS` (``--batch-size`` ↔ ``batch_size`` in
the YAML config); flags override the config, and every value used is written to
``RUN_DIR/config.yaml`` (which ``--config`` accepts back). The jobs themselves live in
:mod:`cartlorem.training.job` and :mod:`cartlorem.demo`. Log messages of the library reach the
terminal (stderr) here: INFO and above with progress on, warnings only with ``--no-progress``.
User errors print ``error: …`` and exit with status 2; a diverged training exits with 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

__all__ = ["main", "build_parser"]

_LOGGER = "cartlorem.cli"  # not __name__, which is "__main__" under python -m / torchrun -m (outside "cartlorem")


class _TerminalHandler(logging.Handler):
    """Log records as plain lines on the current sys.stderr, without breaking tqdm progress bars."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        level = record.levelno
        prefix = "note: " if level == logging.WARNING else ("error: " if level > logging.WARNING else "")
        tqdm.write(prefix + record.getMessage(), file=sys.stderr)


class _HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" where the help text does not already say it and X means something."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (
            "default" not in text
            and not (action.default is None or action.default is argparse.SUPPRESS or isinstance(action.default, bool))
            and action.option_strings
        ):
            text += " (default: %(default)s)"
        return text


def _threads(n) -> None:
    import torch

    if n is not None:
        if n < 1:
            raise ValueError(f"threads must be >= 1, got {n}")
        torch.set_num_threads(n)


def _refuse_overwriting_inputs(outputs: dict, inputs: dict) -> None:
    """ValueError if an output file (name → path, None: not asked for) is one of the input files or another output:
    writing it would destroy the input (a model replaced by its TorchScript export, a dataset by predictions)."""
    from .fileio import same_file

    outputs = {name: path for name, path in outputs.items() if path is not None}
    for k, (name, path) in enumerate(outputs.items()):
        for other, source in inputs.items():
            if same_file(path, source):
                raise ValueError(f"{name} {str(path)!r} is the {other} {str(source)!r}: writing it would overwrite "
                                 "that input; choose another file name")
        for other, elsewhere in list(outputs.items())[:k]:
            if same_file(path, elsewhere):
                raise ValueError(f"{other} and {name} are both {str(path)!r}: one would overwrite the other; "
                                 "choose two file names")


# --------------------------------------------------------------------------------------------------
# commands


def _cmd_train(args: argparse.Namespace) -> int:
    from .config import Config, OPTIONS
    from .training.job import run

    # defaults ← RUN_DIR/config.yaml (on --resume without --config) ← --config ← flags
    given = {o.name: getattr(args, o.name) for o in OPTIONS if hasattr(args, o.name)}
    config = getattr(args, "config", None)
    if getattr(args, "auto_resume", False):
        _auto_resume(given, config)
    if config is None and given.get("resume") and given.get("out"):
        previous = Path(given["out"]) / "config.yaml"
        config = str(previous) if previous.is_file() else None
    values = Config.from_yaml(config).as_dict() if config is not None else {}
    cfg = Config.from_dict({**values, **given}, where="options")
    args.run_dir = cfg.out  # where the run is, for main's messages (--out, or 'out' of the config file)
    if "valid_fraction" in given and cfg.valid is not None:
        raise ValueError(
            f"--valid-fraction {cfg.valid_fraction} and the validation file {cfg.valid!r} contradict each other: with "
            "--valid nothing is split off the training set; pass one of them"
        )
    model, result = run(cfg, given=set(given) | set(_config_keys(config)))
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, process 0 alone prints the summary
        _print_summary(result)
    return 0


def _config_keys(config) -> list:
    """The option names a --config file sets (none without one; Config.from_yaml has checked it)."""
    if config is None:
        return []
    import yaml

    return [str(k).replace("-", "_") for k in (yaml.safe_load(Path(config).read_text()) or {})]


def _auto_resume(given: dict, config) -> None:
    """--auto-resume: ``given["resume"]`` is whether the run folder (--out, or 'out' of the --config file) holds a
    checkpoint, and without one the run starts afresh over what an earlier start left (``overwrite``). Every process
    of a torchrun job decides alike: the first checkpoint is written after a whole epoch of collectives, which every
    process has entered by then."""
    from .config import Config
    from .training.run_folder import CHECKPOINT

    for name in ("resume", "overwrite"):
        if name in given:
            raise ValueError(f"--auto-resume decides whether to resume by itself: it does not go with --{name} / "
                             f"--no-{name}")
    out = given.get("out")
    if out is None and config is not None:
        out = Config.from_yaml(config).out
    if out is None:
        raise ValueError("--auto-resume needs the run folder: pass --out")
    # resuming, a config's 'overwrite: true' does not apply; starting, what a crash before the first checkpoint left
    # (model.pt is written before it) is replaced, as --overwrite does
    given["resume"] = (Path(out) / CHECKPOINT).is_file()
    given["overwrite"] = not given["resume"]


def _print_summary(result) -> None:
    from .training import best_epoch_summary

    why = result.stop_reason.replace("_", " ") + ("; it cut that epoch short: --resume continues it"
                                                   if result.cut_short else "")
    print(f"stopped after epoch {result.epochs_completed} ({why}); {best_epoch_summary(result)}")
    if result.model_path is not None:
        print(f"model: {result.model_path}   log: {Path(result.model_path).parent / 'log.csv'}")
    else:
        print("no epoch was trained, so no model file was written (statistics only)")


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import torch

    from .data import DEFAULT_CONFIG_TYPE, _load_frames, labels_the_loss_sees, read_dataset
    from .evaluate import (format_table, metrics, metrics_by_group, metrics_json, not_finite, parity_format,
                           parity_plot, predict)
    from .fileio import atomic_write_text, require_file
    from .model import load_model
    from .training.job import select_device

    for what, path in (("model", args.model), ("data", args.data)):
        require_file(path, what)
    outputs = {"--json": args.json, "--predictions": args.predictions, "--parity": args.parity}
    for flag, name in outputs.items():
        if name == "":  # an unset shell variable: the output was silently not written
            raise ValueError(f"{flag} was given an empty file name")
    _refuse_overwriting_inputs(outputs, {"model file": args.model, "data file": args.data})
    if args.batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {args.batch_size}")
    if args.parity:
        parity_format(args.parity)
    predictions_as = _predictions_format(args.predictions) if args.predictions else None
    digests = None  # of the bytes about to be read (a run that saves a new best model meanwhile changes the file)
    if args.json or predictions_as == "npz":
        from .fileio import file_sha256

        digests = {"model_sha256": file_sha256(args.model), "data_sha256": file_sha256(args.data)}
    model = load_model(args.model)
    device = select_device(args.device)
    _threads(args.threads)
    dtype = getattr(torch, args.dtype) if args.dtype else model.dtype
    model = model.to(device=device, dtype=dtype)
    keys = _evaluate_label_keys(args)
    if predictions_as == "extxyz":
        from .evaluate import PREDICTION_KEYS

        taken = sorted({key for key in keys.values() if key in PREDICTION_KEYS})
        if taken:
            raise ValueError(f"--predictions {args.predictions}: the references are read from {', '.join(taken)}, "
                             "the names under which the file gets this model's predictions; write an .npz file")
    frames = _load_frames(args.data)[1]  # once: for the graphs, the config types and an .xyz of predictions
    graphs = read_dataset(frames, model.cutoff, **keys, require=(), dtype=dtype, name=args.data)
    if model.long_range is not None:  # named by frame, not by its place in a batch
        from .nn.long_range import check_structures

        check_structures(graphs, lambda k: f"{args.data}, frame {k}")
    preds = predict(model, graphs, batch_size=args.batch_size, progress=args.progress)
    labelled = [_has_labels(g) for g in graphs]  # per structure {label: carried}, before the frame weights
    unscored = sum(_has_labels(labels_the_loss_sees(g)) != c for g, c in zip(graphs, labelled))
    if unscored:
        logging.getLogger(_LOGGER).info(
            "labels weighted 0 (atoms.info config_weight or config_energy/forces/stress_weight) in %d structure(s) "
            "are not scored, as in MACE's metrics", unscored)
    m = metrics(preds)
    print(f"model {args.model} on {args.data}")
    print(format_table(m))
    kinds = [str(a.info.get("config_type", DEFAULT_CONFIG_TYPE)) for a in frames]
    if len(set(kinds)) > 1:  # as MACE's evaluation: a table per config_type
        m["by_config_type"] = metrics_by_group(preds, kinds)
        for kind, part in m["by_config_type"].items():
            print(f"\nconfig_type {kind}:")
            print(format_table(part))
    carried = {name: any(c.get(name, False) for c in labelled) for name in ("energy", "forces", "stress")}
    if not (m["n_energy"] or m["n_forces"]):
        logging.getLogger(_LOGGER).warning(
            "every energy and force label of the data is weighted 0 (config_weight, config_energy/forces_weight)"
            if carried["energy"] or carried["forces"] else
            "the data carry no energy or force labels (check --energy-key / --forces-key)")
    else:  # a key given on the command line that no frame holds: a misspelt key, not an unlabelled set
        for name in ("energy", "forces", "stress"):
            flag = getattr(args, f"{name}_key")
            if flag is not None and keys[f"{name}_key"] is not None and not carried[name]:
                logging.getLogger(_LOGGER).warning(
                    f"no structure of {args.data} carries a {name} label under --{name}-key {flag}"
                    + (" (periodic cells only have a stress)" if name == "stress" else ""))
    unscored = [name for name, n in (("dipole", "n_dipole"), ("Born-charge", "n_born_charges"))
                if n in m and not m[n]]
    if unscored:
        logging.getLogger(_LOGGER).warning(
            f"the data carry {' and '.join(unscored)} labels but this model has no long range (no learned "
            "charges), so they are not scored"
        )
    inputs = _evaluated_inputs(args, keys, dtype, digests) if digests is not None else None
    if args.json:
        atomic_write_text(args.json, metrics_json({**m, "inputs": inputs}))
        print(f"metrics written to {args.json}")
    if predictions_as == "npz":
        preds.save(args.predictions, inputs=inputs)
        print(f"predictions written to {args.predictions}")
    elif predictions_as == "extxyz":
        import io

        import ase.io

        text = io.StringIO()
        ase.io.write(text, preds.annotate(frames), format="extxyz")
        atomic_write_text(args.predictions, text.getvalue())
        print(f"predictions written to {args.predictions} (cartlorem_energy, cartlorem_forces, ... in each frame)")
    if args.parity:
        if parity_plot(preds, args.parity):
            print(f"parity plot written to {args.parity}")
        else:
            logging.getLogger(_LOGGER).warning("matplotlib is not installed; no parity plot")
    diverged = not_finite(m)
    if diverged:  # after the files, which show where
        print(f"error: the model's {', '.join(diverged)} predictions are not finite (NaN or inf) for labelled "
              "structures: the model diverged or its weights are damaged", file=sys.stderr)
        return 1
    return 0


def _evaluated_inputs(args: argparse.Namespace, keys: dict, dtype, digests: dict) -> dict:
    """What ``cartlorem evaluate`` scored, for its JSON and npz files: the model and data files (absolute paths and
    the SHA-256 of their bytes, ``digests``, taken before they were read), the label keys read, the precision and
    the cartlorem version."""
    from . import __version__

    return {"model": str(Path(args.model).resolve()), "model_sha256": digests["model_sha256"],
            "data": str(Path(args.data).resolve()), "data_sha256": digests["data_sha256"],
            "label_keys": dict(keys), "dtype": str(dtype).removeprefix("torch."), "cartlorem": __version__}


def _has_labels(g) -> dict:
    return {n: bool(getattr(g, f"has_{n}").any()) for n in ("energy", "forces", "stress", "dipole", "born_charges")
            if getattr(g, f"has_{n}", None) is not None}


def _predictions_format(path) -> str:
    """"extxyz" for a ``--predictions`` file named .xyz or .extxyz (it held npz bytes, which no xyz reader reads),
    else "npz" (under the name as given)."""
    return "extxyz" if Path(path).suffix.lower() in (".xyz", ".extxyz") else "npz"


_LABEL_KEYS = ("energy_key", "forces_key", "stress_key", "dipole_key", "born_charges_key")


def _evaluate_label_keys(args: argparse.Namespace) -> dict:
    """The label keys of ``cartlorem evaluate``: each flag given, else the key the model's run trained with (the
    config.yaml that ``cartlorem train`` writes beside model.pt), else the default; says which came from the run."""
    from .config import Config, parse_label_key

    given = {name: getattr(args, name) for name in _LABEL_KEYS if getattr(args, name) is not None}
    run_config, trained = Path(args.model).parent / "config.yaml", {}
    if len(given) < len(_LABEL_KEYS) and run_config.is_file():
        import yaml

        try:
            written = yaml.safe_load(run_config.read_text())
            # a config of this model's run: it names the keys; anything else (no mapping, no keys) is not one
            if isinstance(written, dict) and "energy_key" in written and "forces_key" in written:
                for name in _LABEL_KEYS:  # each on its own: one bad key does not drop the others
                    try:  # '' meant no label before it was refused (622fdc5)
                        trained[name] = None if written.get(name) == "" else parse_label_key(written[name])
                    except (KeyError, ValueError, argparse.ArgumentTypeError):
                        continue
        except (yaml.YAMLError, OSError, UnicodeDecodeError, ValueError):
            trained = {}
    default = Config()  # train's defaults, which evaluate shares
    keys = {name: parse_label_key(given[name]) if name in given else trained.get(name, getattr(default, name))
            for name in _LABEL_KEYS}
    from_run = {name: keys[name] for name in _LABEL_KEYS if name not in given and name in trained
                and trained[name] != getattr(default, name)}
    if from_run:
        shown = ", ".join(f"--{name.replace('_', '-')} {value if value else 'none'}" for name, value in from_run.items())
        print(f"label keys of the run that trained the model ({run_config}): {shown}")
    return keys


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    from .training.job import select_device

    device = select_device(args.device)
    _threads(args.threads)
    return run_demo(
        args.out, data=args.data, epochs=args.epochs, max_time=args.max_time, channels=args.channels,
        long_range=args.long_range, md_steps=args.md_steps, timestep=args.timestep,
        temperature=args.temperature, seed=args.seed, device=device, progress=args.progress,
        say=lambda line: print(line, flush=True),
    )


def _cmd_export(args: argparse.Namespace) -> int:
    import torch

    from .fileio import require_file
    from .model import load_model

    require_file(args.model, "model")
    if not args.out:
        raise ValueError("the output file was given an empty name")
    _refuse_overwriting_inputs({"the output file": args.out}, {"model file": args.model})
    model = load_model(args.model)
    if args.dtype is not None:
        model = model.to(getattr(torch, args.dtype))
    if args.metatomic:
        try:
            from .integrations.metatomic import save_metatomic

            save_metatomic(model, args.out)
        except ImportError as err:
            raise ValueError(f"--metatomic: {err}") from None
        print(f"metatomic model ({model.dtype}): {args.out}   (metatomic_ase.MetatomicCalculator({args.out!r}))")
    else:
        from .export import save_exported

        save_exported(model, args.out)
        print(f"TorchScript model ({model.dtype}): {args.out}   (torch.jit.load; inputs and outputs: "
              "cartlorem.export.ExportedCartLorem)")
    return 0


# --------------------------------------------------------------------------------------------------
# parser and entry point


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .config import add_flags, parse_float, parse_int, parse_label_key, parse_output_path, parse_path

    p = argparse.ArgumentParser(
        prog="cartlorem",
        description="Interatomic potentials on irreducible Cartesian tensors: train, evaluate, or run the demo.",
    )
    p.add_argument("--version", action="version", version=f"cartlorem {__version__}")
    sub = p.add_subparsers(dest="command", metavar="{train,evaluate,demo,export}")

    t = sub.add_parser(
        "train",
        help="train a model on an extxyz dataset",
        argument_default=argparse.SUPPRESS,
        description="Train a CartLorem model. Every option is also a key of the YAML --config (dashes become "
        "underscores); flags override the config, and all values used are written to RUN_DIR/config.yaml. "
        "Writes RUN_DIR/model.pt (best EMA weights), checkpoint.pt, log.csv and learning_curve.png.",
    )
    add_flags(t)
    t.add_argument("--auto-resume", action="store_true",
                   help="continue the run in --out if it holds a checkpoint, else start it afresh (over what a "
                   "start that ended before its first checkpoint left): one command line for the first start and "
                   "every restart (torchrun --max-restarts, a scheduler's requeue)")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser(
        "evaluate",
        help="accuracy of a model on a labelled dataset",
        formatter_class=_HelpFormatter,
        description="Energy (meV/atom), force (meV/Å) and, where labelled, stress (meV/Å³), dipole (e·Å) and Born "
        "effective charge (e) MAE and RMSE of a model on a dataset.",
    )
    e.add_argument("--model", required=True, type=parse_path, metavar="MODEL.pt",
                   help="model file (save_model / cartlorem train)")
    e.add_argument("--data", required=True, type=parse_path, metavar="TEST.xyz", help="labelled structures (extxyz)")
    e.add_argument("--json", type=parse_output_path, metavar="METRICS.json",
                   help="also write the metrics as JSON (a NaN or infinite one as null)")
    e.add_argument("--predictions", type=parse_output_path, metavar="PRED.{npz,xyz}",
                   help="also write the predictions: .xyz / .extxyz (the data's frames with cartlorem_energy, "
                        "cartlorem_forces, ... beside their references), or any other name: numpy's npz (eV, Å)")
    e.add_argument("--parity", type=parse_output_path, metavar="PARITY.{png,pdf,svg}",
                   help="also write energy/force parity plots")
    e.add_argument("--batch-size", type=parse_int, default=16, metavar="N", help="structures per batch")
    trained = " (default: the key the model was trained with, read from the config.yaml of its run, else '{}')"

    def key(v):  # checked as train's keys are, kept as given ('none' is a choice, not "not given")
        parse_label_key(v)
        return v

    for name, where in (("energy", "an info key"), ("forces", "an arrays key"), ("stress", "an info key")):
        e.add_argument(f"--{name}-key", type=key, default=None, metavar="KEY",
                       help=f"{name} label: 'calc' (ASE results), {where} or 'none'" + trained.format("calc"))
    e.add_argument("--dipole-key", type=key, default=None, metavar="KEY",
                   help="molecular dipole label (e·Å): an info key, 'calc' (ASE results) or 'none'"
                   + trained.format("dipole"))
    e.add_argument("--born-charges-key", type=key, default=None, metavar="KEY",
                   help="Born effective charge label ([N, 9], e): an arrays key, 'calc' (ASE's "
                        "born_effective_charges) or 'none'" + trained.format("born_charges"))
    e.add_argument("--device", default="cpu", help="cpu or cuda")
    e.add_argument("--dtype", choices=["float32", "float64"], default=None, help="precision (default: the model's)")
    e.add_argument("--threads", type=parse_int, default=None, metavar="N",
                   help="CPU threads for torch (default: torch's choice)")
    e.add_argument("--no-progress", dest="progress", action="store_false", help="turn off the progress bar")
    e.set_defaults(func=_cmd_evaluate)

    d = sub.add_parser(
        "demo",
        help="train, evaluate and run MD on the bundled demo data (a few minutes on a CPU)",
        formatter_class=_HelpFormatter,
        description="Train a small model on the bundled GFN2-xTB clusters (train/validation/test split), report "
        "test accuracy, and run NVE molecular dynamics with the ASE calculator, printing the energy drift.",
    )
    d.add_argument("--out", default="cartlorem_demo_run", type=parse_path, metavar="DIR",
                   help="output folder (overwritten)")
    d.add_argument("--epochs", type=parse_int, default=20, metavar="N", help="training epochs")
    d.add_argument("--max-time", type=parse_float, default=110.0, metavar="SECONDS",
                   help="training time budget (a safety net on slow machines)")
    d.add_argument("--channels", type=parse_int, default=16, metavar="N", help="features per rank")
    d.add_argument("--long-range", choices=["multipole", "lorem", "none"], default="none", help="long-range block")
    d.add_argument("--md-steps", type=parse_int, default=400, metavar="N", help="NVE MD steps")
    d.add_argument("--timestep", type=parse_float, default=0.5, metavar="FS", help="MD time step in fs")
    d.add_argument("--temperature", type=parse_float, default=300.0, metavar="K", help="initial temperature")
    d.add_argument("--seed", type=parse_int, default=0, help="random seed")
    d.add_argument("--device", default="cpu", help="cpu or cuda")
    d.add_argument("--threads", type=parse_int, default=1, metavar="N",
                   help="CPU threads for torch (one is fastest for this small model)")
    d.add_argument("--data", type=parse_path, metavar="FILE.xyz", help="use this dataset instead of the bundled one")
    d.add_argument("--no-progress", dest="progress", action="store_false",
                   help="turn off progress bars and per-epoch lines")
    d.set_defaults(func=_cmd_demo)

    x = sub.add_parser(
        "export",
        help="write a model that engines load: TorchScript, or a metatomic model",
        formatter_class=_HelpFormatter,
        description="Compile a model file with torch.jit.script (cartlorem.export.ExportedCartLorem: tensor inputs, "
        "energy, forces and stress) or, with --metatomic, save it as a metatomic AtomisticModel (metatomic's ASE "
        "calculator, LAMMPS, i-PI, ...; needs pip install metatomic-torch).",
    )
    x.add_argument("model", type=parse_path, metavar="MODEL", help="model file (save_model / cartlorem train)")
    x.add_argument("out", type=parse_output_path, metavar="OUT", help="file to write")
    x.add_argument("--metatomic", action="store_true", help="write a metatomic model instead of plain TorchScript")
    x.add_argument("--dtype", choices=["float32", "float64"], default=None, help="precision (default: the model's)")
    x.set_defaults(func=_cmd_export)
    return p


#: what a command reports in one "error:" line with exit status 2 (a refused input), not a traceback; the engines'
#: runners (python -m cartlorem.integrations.lammps / .ipi) do the same
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)


def _env_rank() -> int:
    """This process's RANK in a torchrun job of several processes, else 0 (also for values that are not whole
    numbers: the process group names those when it starts)."""
    try:
        return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0
    except ValueError:
        return 0


def main(argv=None) -> int:
    """Entry point of the ``cartlorem`` console script; returns the exit status."""
    from .fileio import WriteError
    from .training import NonFiniteLossError
    from .training.distributed import LocalProcessError, PeerStoppedError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error argparse has already printed
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return 2
    import torch

    threads = torch.get_num_threads()  # --threads holds for this call: a program that calls main() keeps its own
    logger, handler = logging.getLogger("cartlorem"), _TerminalHandler()
    level = logging.INFO if getattr(args, "progress", True) else logging.WARNING
    old_level, old_propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False  # printed once, by this handler, also in a program whose root logger has handlers
    # a training run under torchrun: every process meets the same refusals (the same options and data) and the same
    # interrupt, and process 0 alone says them, as it alone prints the summary (but a refusal of one process's own)
    rank = _env_rank() if args.command == "train" else 0

    def say(message: str, err=None) -> None:
        if rank == 0 or isinstance(err, LocalProcessError):
            print(message, file=sys.stderr)

    try:
        return args.func(args)
    except USER_ERRORS as err:
        say(f"error: {err}", err)
        return 2
    except NonFiniteLossError as err:  # each process names the structures of its own part of the batch
        print(f"error: {err}", file=sys.stderr)
        return 1
    except WriteError as err:  # a full disk, a file-size limit, ...: the file being written kept its content
        out = getattr(args, "run_dir", None) if args.command == "train" else None
        print(f"error: could not write {err.filename}: {err.strerror}", file=sys.stderr)
        if out is not None and (Path(out) / "checkpoint.pt").is_file():
            print(f"the training run in {out} is kept as its last checkpoint left it: fix the cause (disk space, "
                  "file-size limit) and continue it with --resume", file=sys.stderr)
        return 1
    except OSError as err:  # may be one process's own (its files, its device): each says its own
        print(f"error: {err.strerror or err}" + (f": {err.filename}" if err.filename else ""), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        out = getattr(args, "run_dir", None) if args.command == "train" else None
        if out is not None and (Path(out) / "checkpoint.pt").is_file():
            say(f"\ninterrupted; the training run in {out} continues with --resume")
        elif out is not None:
            say(f"\ninterrupted before the first epoch ended: no checkpoint in {out} to resume from")
        else:
            say("\ninterrupted")
        return 130
    except PeerStoppedError as err:  # process 0 ended (a refused write, an error): it says why
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        logger.propagate = old_propagate
        torch.set_num_threads(threads)


if __name__ == "__main__":
    sys.exit(main())
