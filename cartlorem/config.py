"""The options of a training run, declared once: the Python API, the YAML file and the flags are views.

    cfg = Config(train="train.xyz", out="run", channels=32, epochs=50)   # Python
    cfg = Config.from_yaml("run.yaml")                                    # YAML (same keys)
    cartlorem train --train train.xyz --out run --channels 32             # flags (dashes)

:data:`OPTIONS` is the one table: name (config key; the flag is ``--name-with-dashes``), value
parser, default, help text and group. The model group is read from ``CartLorem.__init__`` (every
hyperparameter except those set from data and the inference switch), the training defaults from
``cartlorem.training.train``, so a new model argument or a new default appears everywhere at
once. :class:`Config` is a dataclass generated from the table; every value goes through its
option's parser, and unknown keys get a "did you mean" error.

A dataclass rather than jsonargparse: the table is ~60 lines, needs no new dependency, and keeps
the value parsers (elements such as "H,O", "none" for optional numbers) and the error wording the
tests pin down; jsonargparse would generate the flags from signatures too, but not the data-
and run-level options, and it would add a required package.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

__all__ = ["Option", "OPTIONS", "Config", "option_names", "add_flags"]


# --------------------------------------------------------------------------------------------------
# value parsers (flags and config values alike); they raise argparse.ArgumentTypeError


def _named(name: str):
    def deco(fn):
        fn.__name__ = name  # argparse names the parser in "invalid <name> value"
        return fn

    return deco


@_named("float")
def parse_float(v) -> float:
    if isinstance(v, bool):
        raise argparse.ArgumentTypeError(f"expected a number, got {v!r}")
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a number, got {v!r}") from None
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {v!r}")
    return x


@_named("int")
def parse_int(v) -> int:
    if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
        raise argparse.ArgumentTypeError(f"expected an integer, got {v!r}")
    try:
        return int(v)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected an integer, got {v!r}") from None


@_named("bool")
def parse_bool(v) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("true", "yes", "on", "1"):
        return True
    if s in ("false", "no", "off", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {v!r}")


@_named("text")
def parse_text(v) -> str:
    if not isinstance(v, (str, int, float)) or isinstance(v, bool):
        raise argparse.ArgumentTypeError(f"expected text, got {v!r}")
    return str(v)


@_named("path")
def parse_path(v) -> str:
    """A path with '~' expanded ("" stays "", not ".": the commands name it as given)."""
    if not isinstance(v, os.PathLike):
        v = parse_text(v)
        if not v:
            return v
    return str(Path(v).expanduser())


@_named("path")
def parse_output_path(v) -> str:
    """:func:`parse_path` for a file to write, keeping a trailing separator ("results/" names a folder: the writer
    refuses it, where the path without it made a file named results)."""
    path = parse_path(v)
    if isinstance(v, str) and path and v.endswith(("/", os.sep)) and not path.endswith(os.sep):
        path += os.sep
    return path


@_named("species")
def parse_species(v) -> list[int]:
    """"H,O,Na" or ["H", 8, "11"] → sorted atomic numbers."""
    from ase.data import atomic_numbers

    items = v.replace(",", " ").split() if isinstance(v, str) else [v] if isinstance(v, int) else v
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


@_named("mapping")
def parse_mapping(v) -> dict:
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError(f"expected a mapping (key: value entries), got {v!r}")
    return dict(v)


@_named("mapping")
def parse_config_type_weights(v) -> dict:
    """{config_type: weight >= 0}, from a mapping or its text (JSON or a Python literal, as MACE's
    ``--config_type_weights '{"Default": 1.0}'``)."""
    if isinstance(v, str):
        import ast

        try:
            v = ast.literal_eval(v.strip())
        except (ValueError, SyntaxError, MemoryError, RecursionError):  # the last two: text nested thousands deep
            raise argparse.ArgumentTypeError(f"expected a mapping such as '{{\"Default\": 1.0, \"bulk\": 2.0}}', "
                                             f"got {v[:200]!r}") from None
    out = {}
    for key, value in parse_mapping(v).items():
        if not isinstance(key, str):
            raise argparse.ArgumentTypeError(f"config types are names (text), got {key!r}")
        weight = parse_float(value)
        if weight < 0:
            raise argparse.ArgumentTypeError(f"the weight of config_type {key!r} must be >= 0, got {value!r}")
        out[key] = weight
    return out


@_named("mapping")
def parse_long_range_options(v) -> dict:
    """A mapping whose keys are options of ``cartlorem.nn.long_range.LongRangeBlock`` (besides those the
    model sets: channels, kind, lmax) or CartLorem's ``placement`` / ``end_features``."""
    from .nn.long_range import check_long_range_keys, long_range_option_defaults

    options = parse_mapping(v)
    try:
        check_long_range_keys(options)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    defaults = long_range_option_defaults()
    if isinstance(options.get("charge_correction"), str) and options["charge_correction"].strip().lower() in (
            "none", "null", "false"):  # YAML's text for "off", as elsewhere in the config
        options["charge_correction"] = None
    for key in options:
        # numbers by the type of the block's default (the block checks the ranges; other options it checks whole)
        default = defaults[key]
        parse = {int: parse_int, float: parse_float}.get(type(default))
        if parse is not None:
            try:
                options[key] = parse(options[key])
            except argparse.ArgumentTypeError as err:
                raise argparse.ArgumentTypeError(f"{key}: {err}") from None
    return options


def nullable(parse: Callable) -> Callable:
    """``parse``, with None / "none" / "null" / "" meaning None."""

    def fn(v):
        if v is None or (isinstance(v, str) and v.strip().lower() in ("none", "null", "")):
            return None
        return parse(v)

    fn.__name__ = parse.__name__
    return fn


def choice(*choices: str) -> Callable:
    def fn(v):
        s = "none" if v is None else parse_text(v).lower()
        if s not in choices:
            raise argparse.ArgumentTypeError(f"expected one of {', '.join(choices)}, got {v!r}")
        return s

    fn.__name__ = "choice"
    fn.choices = choices
    return fn


@_named("key")
def parse_label_key(v) -> Optional[str]:
    s = parse_text(v) if v is not None else "none"
    if not s.strip():  # an unset shell variable: "no label" must be said with 'none'
        raise argparse.ArgumentTypeError("expected 'calc', an atoms.info / atoms.arrays key or 'none', got ''")
    return None if s.lower() == "none" else s


# --------------------------------------------------------------------------------------------------
# the table


@dataclasses.dataclass(frozen=True)
class Option:
    """One option: config key ``name`` (flag ``--name-with-dashes``), value parser, default, help,
    group ("data", "model", "training", "run"); ``flag=False``: config file only; ``check``: a
    (predicate, "what it must be") pair for the value."""

    name: str
    parse: Callable
    default: Any
    help: str
    group: str
    flag: bool = True
    check: Optional[tuple] = None


def _defaults(fn) -> dict:
    return {k: p.default for k, p in inspect.signature(fn).parameters.items() if p.default is not p.empty}


# CartLorem arguments the data decide (species, statistics) or that only inference uses
_MODEL_FROM_DATA = ("species", "atomic_energies", "avg_num_neighbors", "scale", "shift", "compile_kernels")
_MODEL_HELP = {
    "cutoff": "local cutoff in Å",
    "long_range": "long-range block",
    "channels": "features per rank",
    "num_layers": "interaction layers",
    "correlation": "body order of the products",
    "lmax": "highest feature rank (0, 1 or 2)",
    "num_basis": "Bessel radial basis functions",
    "radial_hidden": "width of the radial MLP",
    "envelope_p": "polynomial envelope exponent",
    "readout_hidden": "width of the last readout MLP",
    "long_range_options": "options of the long-range block (config only)",
    "charge_state": "condition the features on each structure's total charge and spin multiplicity "
                    "(atoms.info total_charge, multiplicity)",
}
_POSITIVE = (lambda v: v > 0, "> 0")
_NON_NEGATIVE = (lambda v: v >= 0, ">= 0")
_MODEL_CHECKS = {"cutoff": _POSITIVE, "channels": (lambda v: v >= 1, ">= 1")}


def _model_options() -> list[Option]:
    from .model import LONG_RANGE_CHOICES, CartLorem

    out = []
    for name, default in _defaults(CartLorem.__init__).items():
        if name in _MODEL_FROM_DATA:
            continue
        if name == "long_range":
            names = tuple("none" if c is None else c for c in LONG_RANGE_CHOICES)
            out.append(Option(name, choice(*names), "none" if default is None else default, _MODEL_HELP[name], "model"))
        elif name == "long_range_options":
            out.append(Option(name, nullable(parse_long_range_options), None, _MODEL_HELP[name], "model",
                              flag=False))
        else:
            parse = {bool: parse_bool, int: parse_int, float: parse_float}[type(default)]
            out.append(Option(name, parse, default, _MODEL_HELP.get(name, f"CartLorem argument {name}"), "model",
                              check=_MODEL_CHECKS.get(name)))
    return out


def _options() -> list[Option]:
    from .training import DEFAULT_WEIGHTS, train

    T = _defaults(train)
    key_help = "'calc' (ASE single-point results), an atoms.info/arrays key such as REF_{0}, or 'none' to ignore"
    data = [
        Option("train", nullable(parse_path), None, "training set (extxyz or any ASE-readable file) [required]", "data"),
        Option("valid", nullable(parse_path), None, "validation set (default: --valid-fraction of the training set)",
               "data"),
        Option("valid_fraction", parse_float, 0.1, "fraction of the training set held out when --valid is not given",
               "data", check=(lambda v: 0 <= v < 1, "in [0, 1)")),
        Option("energy_key", parse_label_key, "calc", key_help.format("energy"), "data"),
        Option("forces_key", parse_label_key, "calc", key_help.format("forces"), "data"),
        Option("stress_key", parse_label_key, "calc", key_help.format("stress") + " (used where present)", "data"),
        Option("dipole_key", parse_label_key, "dipole",
               "atoms.info key of the molecular dipole label (e·Å; open structures only), 'calc' for the "
               "calculator's dipole, or 'none' to ignore (used where present)", "data"),
        Option("born_charges_key", parse_label_key, "born_charges",
               "atoms.arrays key of the Born effective charge labels ([N, 9] row-major dP_a/dr_ib, e), 'calc' for "
               "the calculator's born_effective_charges, or 'none' (used where present)", "data"),
        Option("species", nullable(parse_species), None,
               "elements the model knows, e.g. H,O,Na,Cl (default: all in the data)", "data"),
        Option("config_type_weights", nullable(parse_config_type_weights), None,
               "weight in the training loss of the frames of each atoms.info config_type, as MACE's: e.g. "
               "'{\"Default\": 1.0, \"bulk\": 2.0}' (a frame without config_type is 'Default'; other types 1; "
               "multiplies a frame's config_weight)", "data"),
    ]
    t = "training"
    training = [
        Option("epochs", parse_int, T["epochs"],
               "at most this many epochs in all (early stopping or max_time usually ends the run first)", t,
               check=(lambda v: v >= 0, ">= 0")),
        Option("batch_size", parse_int, T["batch_size"],
               "structures per optimiser step (under torchrun: the global batch over all processes)", t,
               check=(lambda v: v >= 1, ">= 1")),
        Option("valid_batch_size", nullable(parse_int), T["valid_batch_size"],
               "structures per validation batch on each process (default: 2 × the per-process training batch)", t,
               check=(lambda v: v is None or v >= 1, ">= 1")),
        Option("lr", parse_float, T["lr"], "initial learning rate", t, check=_POSITIVE),
        Option("energy_weight", parse_float, DEFAULT_WEIGHTS["energy"], "loss weight of the energy per atom", t,
               check=_NON_NEGATIVE),
        Option("forces_weight", parse_float, DEFAULT_WEIGHTS["forces"], "loss weight of the forces", t,
               check=_NON_NEGATIVE),
        Option("stress_weight", parse_float, DEFAULT_WEIGHTS["stress"], "loss weight of the stress", t,
               check=_NON_NEGATIVE),
        Option("dipole_weight", parse_float, DEFAULT_WEIGHTS["dipole"],
               "loss weight of the molecular dipole (e·Å; needs long range and dipole labels)", t,
               check=_NON_NEGATIVE),
        Option("born_charges_weight", parse_float, DEFAULT_WEIGHTS["born_charges"],
               "loss weight of the Born effective charges (e; needs long range and labels)", t,
               check=_NON_NEGATIVE),
        Option("optimizer", choice("adam", "amsgrad"), T["optimizer"], "optimiser", t),
        Option("weight_decay", parse_float, T["weight_decay"], "weight decay", t, check=(lambda v: v >= 0, ">= 0")),
        Option("ema_decay", nullable(parse_float), T["ema_decay"], "decay of the weight average (0 or none: off)", t,
               check=(lambda v: v is None or 0 <= v < 1, "in [0, 1)")),
        Option("scheduler_factor", parse_float, T["scheduler_factor"], "learning-rate factor on a plateau", t,
               check=(lambda v: 0 < v < 1, "in (0, 1)")),
        Option("scheduler_patience", parse_int, T["scheduler_patience"],
               "the learning rate drops after this many epochs + 1 in a row without an improvement of more than "
               "0.01%%", t,
               check=(lambda v: v >= 0, ">= 0")),
        Option("clip_grad", nullable(parse_float), T["clip_grad"], "maximum gradient norm (none: no clipping)", t,
               check=(lambda v: v is None or v > 0, "> 0")),
        Option("patience", nullable(parse_int), T["patience"],
               "early stopping after this many epochs without a better validation loss (none: never)", t,
               check=(lambda v: v is None or v >= 1, ">= 1")),
        Option("max_time", nullable(parse_float), T["max_time"], "wall-clock budget of the training in seconds", t,
               check=(lambda v: v is None or v > 0, "> 0")),
        Option("seed", parse_int, T["seed"], "random seed (initial weights, split, batch order)", t,
               check=(lambda v: v >= 0, ">= 0")),
        Option("workers", parse_int, T["workers"], "DataLoader worker processes for training batches", t,
               check=(lambda v: v >= 0, ">= 0")),
        Option("compile", parse_bool, T["compile"],
               "compile the training step with torch.compile: the first step compiles (minutes on a CPU), the "
               "later ones run 2-4x faster (local and long-range models, on molecules, periodic cells and slabs; "
               "periodic batches too large for one reciprocal sum and the dipole / Born-charge terms train eagerly)", t),
    ]
    r = "run"
    run = [
        Option("out", nullable(parse_path), None,
               "output folder (model.pt, checkpoint.pt, config.yaml, log.csv) [required]", r),
        Option("device", parse_text, "cpu", "cpu or cuda (falls back to the CPU when CUDA is absent)", r),
        Option("threads", nullable(parse_int), None,
               "CPU threads for torch (default: torch's choice; 1 is often fastest for small models)", r,
               check=(lambda v: v is None or v >= 1, ">= 1")),
        Option("dtype", choice("float32", "float64"), "float64", "floating-point precision", r),
        Option("resume", parse_bool, T["resume"], "continue the run in --out from its checkpoint", r),
        Option("overwrite", parse_bool, T["overwrite"], "start afresh even if --out holds a run", r),
        Option("progress", parse_bool, T["progress"], "progress bars and one line per epoch", r),
    ]
    return data + _init_options() + _model_options() + training + run


def _init_options() -> list[Option]:
    """Fine-tuning: the run starts from a trained model (its architecture, weights and statistics)."""
    return [
        Option("init_model", nullable(parse_path), None,
               "start from this trained model (model.pt or checkpoint.pt): its architecture, species, weights, "
               "reference energies and scale; the model options below come from it, and one given must agree "
               "(fine-tuning)", "model"),
        Option("refit_reference_energies", parse_bool, False,
               "with --init-model: correct its per-element reference energies by a least-squares fit to what it "
               "leaves of the training energies (data from another code or level of theory)", "model"),
        Option("add_elements", parse_bool, False,
               "with --init-model: add the elements of the training data that the model does not know (their "
               "embedding and per-element weights start as a new model's, their reference energies are fitted to "
               "the training energies; the model's elements predict as before)", "model"),
    ]


OPTIONS: list[Option] = _options()
_BY_NAME = {o.name: o for o in OPTIONS}
INIT_OPTIONS = tuple(o.name for o in _init_options())
# CartLorem arguments
MODEL_OPTIONS = tuple(o.name for o in OPTIONS if o.group == "model" and o.name not in INIT_OPTIONS)
# train() keywords that are options of the same name (weights and out_dir are assembled)
_TRAIN_KEYS = tuple(
    o.name for o in OPTIONS if o.group == "training" and not o.name.endswith("_weight")
) + ("resume", "overwrite", "progress")


def option_names() -> list[str]:
    """Every config key, in table order."""
    return [o.name for o in OPTIONS]


def parse_value(name: str, value, where: str = "") -> Any:
    """``value`` through the parser and check of option ``name``; ValueError naming ``where`` and the key."""
    o = _BY_NAME[name]
    prefix = f"{where}: " if where else ""
    try:
        v = o.parse(value)
    except argparse.ArgumentTypeError as err:
        raise ValueError(f"{prefix}key {name!r}: {err}") from None
    if o.check is not None and not o.check[0](v):
        raise ValueError(f"{prefix}{name} must be {o.check[1]}, got {v}")
    return v


class _ConfigMethods:
    """Methods of :class:`Config` (the fields come from :data:`OPTIONS`)."""

    def __post_init__(self):
        for o in OPTIONS:
            object.__setattr__(self, o.name, parse_value(o.name, getattr(self, o.name)))
        if self.refit_reference_energies and self.init_model is None:
            raise ValueError("refit_reference_energies corrects the reference energies of the model in init_model, "
                             "and there is none: a run from random weights fits them from the data anyway; pass "
                             "--init-model or leave --refit-reference-energies out")
        if self.add_elements and self.init_model is None:
            raise ValueError("add_elements adds elements to the model in init_model, and there is none: a run from "
                             "random weights takes every element of its data anyway; pass --init-model or leave "
                             "--add-elements out")
        if self.long_range == "none" and self.long_range_options:  # the model would refuse them, after the data
            raise ValueError(f"long_range_options {self.long_range_options!r} are options of the long-range block, "
                             "and long_range is 'none' (no block): drop them, or set long_range to 'multipole' "
                             "or 'lorem'")
        if self.long_range != "none" and self.long_range_options:  # as the model will, before the data are read
            from .nn.long_range import check_block_options, without_no_op_options

            options, changed = without_no_op_options(self.long_range_options, self.lmax)
            if changed:  # e.g. the config.yaml of an older run, which a resume reads: the same model without them
                logging.getLogger(__name__).warning("long_range_options: %s; left out", "; ".join(changed))
                object.__setattr__(self, "long_range_options", options)
            check_block_options(self.long_range_options, self.long_range, self.num_layers, self.lmax)

    @classmethod
    def from_dict(cls, values: Mapping, where: str = "config") -> "Config":
        """A Config from ``values`` (dashes in keys become underscores); ValueError for an unknown key,
        with the closest valid key as a hint."""
        if not isinstance(values, Mapping):
            raise ValueError(f"{where} must hold 'key: value' entries, got a {type(values).__name__}")
        out = {}
        for key, value in values.items():
            name = str(key).replace("-", "_")
            if name not in _BY_NAME:
                close = difflib.get_close_matches(name, list(_BY_NAME), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"{where}: unknown key {key!r}{hint}; valid keys: {', '.join(_BY_NAME)}")
            out[name] = parse_value(name, value, where)
        return cls(**out)

    @classmethod
    def from_yaml(cls, path) -> "Config":
        import yaml

        from .fileio import require_file

        require_file(path, "config")
        p = Path(path)
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"config file {str(path)!r} is not valid YAML: {err}") from None
        return cls.from_dict(raw, where=f"config file {str(path)!r}")

    def as_dict(self) -> dict:
        return {o.name: getattr(self, o.name) for o in OPTIONS}

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)

    def to_yaml(self, path, header: str = "") -> None:
        """Write every value (defaults included) so that :meth:`from_yaml` reads the same Config."""
        import yaml

        from .fileio import atomic_write_text

        values = self.as_dict()
        if values["species"] is not None:  # element symbols read better than atomic numbers
            from ase.data import chemical_symbols

            values["species"] = [chemical_symbols[z] for z in values["species"]]
        atomic_write_text(path, header + yaml.safe_dump(values, sort_keys=False, allow_unicode=True))

    def model_kwargs(self) -> dict:
        """Keyword arguments of ``CartLorem`` (besides species)."""
        kw = {name: getattr(self, name) for name in MODEL_OPTIONS}
        kw["long_range"] = None if kw["long_range"] == "none" else kw["long_range"]
        return kw

    def build_model(self, species):
        """``CartLorem(species, **model_kwargs())``."""
        from .model import CartLorem

        return CartLorem(species, **self.model_kwargs())

    def train_kwargs(self) -> dict:
        """Keyword arguments of ``cartlorem.training.train`` (without out_dir)."""
        kw = {name: getattr(self, name) for name in _TRAIN_KEYS}
        kw["weights"] = {n: getattr(self, f"{n}_weight") for n in ("energy", "forces", "stress", "dipole",
                                                                   "born_charges")}
        return kw

    def label_keys(self) -> dict:
        """Label-key keyword arguments of ``cartlorem.data.read_dataset`` (energy, forces, stress, dipole,
        Born charges)."""
        return {f"{n}_key": getattr(self, f"{n}_key") for n in ("energy", "forces", "stress", "dipole", "born_charges")}


Config = dataclasses.make_dataclass(
    "Config",
    [(o.name, Any, dataclasses.field(default=o.default)) for o in OPTIONS],
    bases=(_ConfigMethods,),
    frozen=True,
)
Config.__module__ = __name__
Config.__doc__ = (
    "Every option of a training run (see :data:`OPTIONS` for names, defaults and help). "
    "Build it in Python (``Config(channels=32)``), from YAML (:meth:`from_yaml`) or from a mapping "
    "(:meth:`from_dict`); ``build_model(species)`` and ``train_kwargs()`` feed the model and the loop."
)


_GROUPS = ("data", "model", "training", "run")
_METAVARS = {"path": "FILE", "int": "N", "float": "X", "species": "ELEMENTS", "key": "KEY"}


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per option (``--batch-size`` for ``batch_size``; ``--NAME`` and ``--no-NAME`` for yes/no
    options), in argument groups, plus ``--config``. Parse with
    ``argument_default=argparse.SUPPRESS`` so that only the flags given appear in the namespace."""
    groups = {g: parser.add_argument_group(g) for g in _GROUPS}
    groups["run"].add_argument("--config", type=parse_path, metavar="CONFIG.yaml",
                               help="YAML file whose keys are the options below (flags override it)")
    for o in OPTIONS:
        if not o.flag:
            continue
        flag, g = "--" + o.name.replace("_", "-"), groups[o.group]
        if o.parse is parse_bool:  # --NAME and --no-NAME: a flag overrides the config (or a resumed run's) both ways
            g.add_argument(flag, dest=o.name, action=argparse.BooleanOptionalAction,
                           help=f"{o.help} (default: {'on' if o.default else 'off'})")
            continue
        shown = "none" if o.default is None else o.default
        text = o.help if ("[required]" in o.help or "(default" in o.help) else f"{o.help} (default: {shown})"
        kwargs = dict(dest=o.name, type=o.parse, help=text, metavar="RUN_DIR" if o.name == "out" else
                      _METAVARS.get(o.parse.__name__, o.name.upper()))
        if hasattr(o.parse, "choices"):
            kwargs.update(choices=list(o.parse.choices), metavar=None)
        g.add_argument(flag, **kwargs)
