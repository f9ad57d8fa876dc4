"""The ``cartlorem train`` job: a :class:`~cartlorem.config.Config` → data → CartLorem → train().

    model, result = run(Config(train="train.xyz", out="run", epochs=50))

Reads the training (and validation) set with the configured label keys, splits off a validation
set when none is given, builds the model for the elements present (or the configured ones) or, with ``init_model``,
starts from a trained model (fine-tuning: its architecture, weights and statistics; :func:`initial_model`),
writes every value used to ``out/config.yaml`` (which ``Config.from_yaml`` reads back) and the data files' SHA-256,
with a split's validation frames, to ``out/data.json`` (a resume checks the files and keeps the split), and trains.

Under ``torchrun --nproc_per_node N`` every process runs this job: the process group comes from
torchrun's environment (gloo for ``device="cpu"``, nccl with one GPU per process for "cuda"),
every process reads the data, and process 0 alone logs and writes files
(``cartlorem.training.distributed``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Optional

import torch

from ..config import MODEL_OPTIONS, Config
from ..data import (MissingLabelError, config_types_of_files, duplicate_structures, is_isolated_atom, read_dataset,
                    split, stress_key_unused)
from ..fileio import atomic_write_text, file_sha256, require_file, same_file
from .distributed import process_group
from .loop import train
from .prepare import refit_reference_energies
from .run_folder import BEST_MODEL, CHECKPOINT, DATA_JSON, RunFolder, restore_model_settings

__all__ = ["run", "select_device", "initial_model"]

log = logging.getLogger(__name__)


def select_device(name: str) -> str:
    """"cpu" or "cuda[:k]"; CUDA falls back to the CPU (with a warning) where it is absent."""
    name = name.strip().lower()
    if name.startswith("cuda"):
        try:
            torch.device(name)
        except RuntimeError:
            raise ValueError(f"device must be cpu, cuda or cuda:N, got {name!r}") from None
        if not torch.cuda.is_available():
            log.warning("CUDA is not available on this machine; running on the CPU")
            return "cpu"
        return name
    if name != "cpu":
        raise ValueError(f"device must be cpu or cuda, got {name!r}")
    return name


def _symbols(species) -> list[str]:
    from ase.data import chemical_symbols

    return [chemical_symbols[int(z)] for z in species]


def _read(path, cfg: Config, require, dtype, training: bool = False):
    try:
        graphs = read_dataset(path, cfg.cutoff, **cfg.label_keys(), require=require, dtype=dtype,
                              config_type_weights=cfg.config_type_weights)
    except MissingLabelError as err:  # read_dataset's advice names its own arguments
        name = err.label
        raise ValueError(
            f"{err.finding} Pass the key that holds it (--{name}-key KEY), train without it (--{name}-key none), "
            "or leave the frames without it out of the file (in Python, read_dataset(..., require=...) reads a "
            "partly labelled set, which train() takes)") from None
    unused = stress_key_unused(graphs, cfg.stress_key) if training else 0
    if unused:
        raise ValueError(f"{path}: --stress-key {cfg.stress_key} is in none of its {unused} fully periodic "
                         "frames (stress is used where present, so a misspelt key trains without it): name the key "
                         "the frames have, or --stress-key none to train without stress")
    if cfg.long_range != "none":  # named by file and frame now, not by batch in the first step
        from ..nn.long_range import check_structures

        check_structures(graphs, lambda k: f"{path}, frame {k}")
    return graphs


def _split_indices(graphs, cfg: Config) -> tuple[list[int], list[int]]:
    """(training, validation) frame indices by ``split``; isolated-atom structures (their elements' reference
    energies, :func:`cartlorem.data.is_isolated_atom`) all stay in training, the others are split as before."""
    isolated = [k for k, g in enumerate(graphs) if is_isolated_atom(g)]
    rest = [k for k in range(len(graphs)) if k not in set(isolated)]
    if not isolated or len(rest) < 2:
        tr, va = split(len(graphs), cfg.valid_fraction, seed=cfg.seed)
        return tr.tolist(), va.tolist()
    tr, va = split(len(rest), cfg.valid_fraction, seed=cfg.seed)
    log.info("%d isolated-atom structure(s) kept in the training set (their elements' reference energies)",
             len(isolated))
    return sorted(isolated + [rest[k] for k in tr]), [rest[k] for k in va]


def _split(graphs, cfg: Config) -> tuple:
    """(training, validation) graphs of :func:`_split_indices`."""
    tr, va = _split_indices(graphs, cfg)
    return [graphs[k] for k in tr], [graphs[k] for k in va]


def _read_data_record(out: Path) -> Optional[dict]:
    """The run's data.json (None when it has none: a run of an older cartlorem, or started from Python)."""
    path = out / DATA_JSON
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        if record.get("validation") is not None:
            record["validation"] = [int(k) for k in record["validation"]]
        record["frames"] = int(record["frames"])
        return record
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"cannot read {path} ({type(err).__name__}: {err}): it records the data the run trained "
                         "and validated on; restore the file, or start a new run (--overwrite or another --out)"
                         ) from None


def _check_same_data(cfg: Config, out: Path, record: Optional[dict]) -> None:
    """ValueError when a resume's training or validation file is not the file the run started with (its SHA-256
    in data.json): the best model, the scheduler and early stopping would compare losses of other structures, and a
    split's validation frames would be others."""
    if record is None:
        return
    for name in ("train", "valid"):
        recorded = record.get(f"{name}_sha256")
        if recorded is not None and getattr(cfg, name) is not None and file_sha256(getattr(cfg, name)) != recorded:
            what = "training" if name == "train" else "validation"
            raise ValueError(
                f"resuming {out}: the {what} file {getattr(cfg, name)} is not the one the run started with (its "
                f"contents changed: SHA-256 {recorded[:12]}... in {DATA_JSON}): the run's best model, learning-rate "
                "schedule and early stopping were judged on other structures; resume with the run's file, or start "
                "a new run (--overwrite or another --out)")


def _recorded_split(cfg: Config, out: Path, record: Optional[dict], frames: int, train: list,
                    valid: list) -> tuple[list, list]:
    """A resumed run's split: the validation frames its data.json recorded (of the same training file:
    :func:`_check_same_data`). A recorded split that this cartlorem would draw otherwise (an older version's rule)
    is kept, with a note; ValueError for a record that names frames the file does not have."""
    if record is None or record.get("validation") is None:
        return train, valid
    recorded = record["validation"]
    if len(set(recorded)) != len(recorded) or not all(0 <= k < frames for k in recorded):
        raise ValueError(f"{out / DATA_JSON} names frames that {cfg.train} does not have once each: restore the file, "
                         "or start a new run (--overwrite or another --out)")
    if sorted(recorded) != valid:
        log.warning("resuming %s with the validation frames recorded in %s (this cartlorem would split the file "
                    "otherwise)", out, DATA_JSON)
        chosen = set(recorded)
        train, valid = [k for k in range(frames) if k not in chosen], sorted(recorded)
    return train, valid


def run(cfg: Config, given: Optional[set] = None):
    """Train a CartLorem as ``cfg`` says; returns (model, TrainResult). ValueError for bad settings. ``given``: the
    names of the options the user set, where known (the command line): with ``init_model``, each model option among
    them must be the model's (:func:`initial_model`)."""
    for name in ("train", "out"):
        if not getattr(cfg, name):
            what = "training set" if name == "train" else "output folder"
            raise ValueError(f"no {what}: pass --{name} or set '{name}' in the config")
    _check_no_contradiction(cfg)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output folder {cfg.out!r} is a file, not a folder: pass another --out")
    for name in ("train", "valid") + (() if cfg.resume else ("init_model",)):  # a resume starts from its checkpoint
        if getattr(cfg, name) is not None:
            require_file(getattr(cfg, name), name)
    if cfg.init_model is not None and not cfg.resume:
        _check_not_replaced(cfg, out)
    if not cfg.resume and (out / CHECKPOINT).exists() and not cfg.overwrite:
        raise FileExistsError(
            f"{out} already holds a training run; pass --resume to continue it or --overwrite to start afresh"
        )
    if cfg.resume and not (out / CHECKPOINT).exists():
        raise FileNotFoundError(f"cannot resume: no {CHECKPOINT} in {out}")
    threads = torch.get_num_threads()  # cfg.threads holds for this call, not for the program that made it
    try:
        with process_group(cfg.device) as (ranks, device), _only_main_logs(ranks.is_main):
            return _run(cfg, out, select_device(device), ranks.is_main, given)
    finally:
        torch.set_num_threads(threads)


def _check_not_replaced(cfg: Config, out: Path) -> None:
    """ValueError when ``init_model`` is a file this run writes (the run folder's model.pt or checkpoint.pt): the
    run would replace the model it starts from."""
    for name in (BEST_MODEL, CHECKPOINT):
        if same_file(cfg.init_model, out / name):
            raise ValueError(f"init_model {cfg.init_model!r} is the {name} of the run folder {cfg.out!r}, which this "
                             "run writes over: copy the model elsewhere, or choose another --out")


def initial_model(cfg: Config, given: Optional[set] = None):
    """(model, cfg) for a run that starts from ``cfg.init_model`` (fine-tuning): the trained model as
    :func:`cartlorem.model.load_model` reads it (weights, species, reference energies, scale and shift), and ``cfg``
    with that model's architecture and, unless given, its dtype, which config.yaml records (so that a resume
    rebuilds it without the file). ValueError when ``cfg`` sets a model option, or species, to something else than
    the model has. ``given``: the names of the options the user set (the command line's flags and --config keys),
    each compared; None (a Config made in Python) compares the options not at their defaults. The others take the
    model's values."""
    from ..model import load_model

    model = load_model(cfg.init_model)
    cfg = _adopt(cfg, given, model.config, model.dtype, f"init_model {cfg.init_model!r}", "leave --init-model out "
                 "to train a new one")
    log.info("starting from %s: %s, %d parameters, its reference energies, scale %.4g and shift %.4f eV/atom",
             cfg.init_model, ", ".join(f"{k} {getattr(cfg, k)}" for k in ("long_range", "channels", "num_layers",
                                                                          "cutoff", "dtype")),
             sum(p.numel() for p in model.parameters()), float(model.scale), float(model.shift))
    return model, cfg


def _resumed_fine_tune(cfg: Config, given: Optional[set], checkpoint: dict, out: Path) -> Config:
    """``cfg`` of a fine-tuning run that resumes, with the architecture, species and (unless given) dtype of the
    model in its checkpoint: they came from the initial model, which a --config file or flags need not restate."""
    from ..model import complete_config

    saved = checkpoint.get("model") or {}
    if not isinstance(saved.get("config"), dict):  # not a CartLorem's checkpoint: restore_model_settings says so
        return cfg
    embedding = (saved.get("state_dict") or {}).get("embedding")  # a weight, in the run's precision
    dtype = embedding.dtype if isinstance(embedding, torch.Tensor) else getattr(torch, cfg.dtype)
    return _adopt(cfg, given, complete_config(saved["config"]), dtype, f"the run in {out}",
                  "resume with the run's settings, or start a new run (--overwrite or another --out)", resume=True)


def _adopt(cfg: Config, given: Optional[set], config: dict, dtype: torch.dtype, source: str, advice: str,
           resume: bool = False) -> Config:
    """``cfg`` with the architecture and species of the model config ``config`` (a CartLorem's), and its ``dtype``
    unless the user set one; ValueError naming the model options given that contradict it (``source`` is the
    model's, ``advice`` what to do)."""
    arch = {name: config[name] for name in MODEL_OPTIONS}
    arch["long_range"] = "none" if arch["long_range"] is None else arch["long_range"]
    default = Config()

    def chosen(name: str) -> bool:
        return name in given if given is not None else getattr(cfg, name) != getattr(default, name)

    names = [name for name in MODEL_OPTIONS + ("species",) if chosen(name)]
    clash = [f"{name} {getattr(cfg, name)!r} (the model's: {arch[name]!r})" for name in names
             if name not in ("long_range_options", "species") and getattr(cfg, name) != arch[name]]
    if "long_range_options" in names and cfg.long_range_options:
        from ..nn.long_range import long_range_option_defaults

        def resolved(options: dict) -> dict:  # as the model builds them: the block's defaults, None as they resolve
            out = {**long_range_option_defaults(), **options}
            out["charge_channels"] = out["lr_channels"] if out["charge_channels"] is None else out["charge_channels"]
            out["placement"], out["end_features"] = out["placement"] or "end", out["end_features"] or "full"
            return out

        used = resolved(arch["long_range_options"]) if arch["long_range"] != "none" else {}
        wanted = resolved(cfg.long_range_options)
        clash += [f"long_range_options {key}={value!r} (the model's: {used.get(key)!r})"
                  for key, value in cfg.long_range_options.items() if used.get(key) != wanted[key]]
    known = list(config["species"])
    species = known
    if "species" in names and cfg.species is not None:
        if cfg.add_elements and not resume and set(cfg.species) >= set(known):  # the model's elements and more
            species = sorted(set(cfg.species))
        elif cfg.add_elements and resume and set(cfg.species) <= set(known):  # the run added the others
            pass
        elif sorted(cfg.species) != sorted(known):
            hint = "" if cfg.add_elements or resume else "; --add-elements adds elements"
            clash.append(f"species {', '.join(_symbols(cfg.species))} (the model's: {', '.join(_symbols(known))}"
                         f"{hint})")
    if clash:
        raise ValueError(f"{source} fixes the architecture of this run, and the settings {'; '.join(clash)} "
                         f"contradict it: leave them out to {'resume' if resume else 'fine-tune'} that model, or "
                         f"{advice}")
    arch["long_range_options"] = arch["long_range_options"] or None
    precision = {} if chosen("dtype") else {"dtype": str(dtype).replace("torch.", "")}
    return cfg.replace(species=species, **arch, **precision)


def _check_no_contradiction(cfg: Config) -> None:
    """ValueError for settings that contradict each other (one of them would be ignored without a word)."""
    if cfg.resume and cfg.overwrite:
        raise ValueError(
            f"--resume and --overwrite contradict each other: --resume continues the run in {cfg.out}, --overwrite "
            "deletes it and starts afresh; pass one of them"
        )
    default_fraction = Config().valid_fraction
    if cfg.valid is not None and cfg.valid_fraction not in (0.0, default_fraction):
        raise ValueError(
            f"valid {cfg.valid!r} and valid_fraction {cfg.valid_fraction} contradict each other: with a validation "
            "file nothing is split off the training set; leave valid_fraction out (--valid-fraction) or the "
            "validation file (--valid)"
        )


@contextlib.contextmanager
def _only_main_logs(main: bool):
    """On processes other than 0 the library logs errors only (process 0 says everything once)."""
    logger = logging.getLogger("cartlorem")
    level = logger.level
    if not main:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _check_same_split(cfg: Config, out: Path) -> None:
    """ValueError when a resume would split the data otherwise than the run did (its config.yaml): another
    training or validation file, validation fraction or, for a split of --train, seed. Validation structures
    would then have been trained on, and the best model's loss would be on another set. Also for another initial
    learning rate or seed, which the checkpoint's state overrides (config.yaml would record a value not used)."""
    previous = out / "config.yaml"
    if not previous.is_file():
        return
    old = Config.from_yaml(previous)

    def path(p):
        return None if p is None else str(Path(p).resolve())

    def changes(names) -> str:
        return ", ".join(f"{name} {getattr(old, name)!r} → {getattr(cfg, name)!r}" for name in names)

    changed = [name for name in ("train", "valid") if path(getattr(cfg, name)) != path(getattr(old, name))]
    if cfg.valid is None and old.valid is None:
        changed += [name for name in ("valid_fraction", "seed") if getattr(cfg, name) != getattr(old, name)]
    # what the checkpoint carries on: a new value would be written to config.yaml and not used
    kept = [name for name in ("lr", "seed") if getattr(cfg, name) != getattr(old, name)]
    def start(c: Config) -> tuple:  # how the run started: its initial model (by path), the refit, the added elements
        return path(c.init_model), c.refit_reference_energies, c.add_elements

    started = [name for name, a, b in zip(("init_model", "refit_reference_energies", "add_elements"), start(cfg),
                                          start(old)) if a != b]
    if changed:
        raise ValueError(
            f"resuming {out} with another split of the data ({changes(changed)}): structures the run validated on "
            "would be trained on, and its best model was chosen on another set; resume with the run's values, or "
            "start a new run (--overwrite or another --out)")
    if cfg.dtype != old.dtype:
        raise ValueError(
            f"resuming {out} with {changes(['dtype'])}: the run's weights, optimiser state and best model are "
            f"{old.dtype}, and config.yaml would record the new one for the whole run; resume with the run's dtype, "
            "or start a new run (--overwrite or another --out)")
    if started:
        raise ValueError(
            f"resuming {out} with {changes(started)}: the run started from its initial model once, and a resume "
            "continues from its checkpoint; resume with the run's values, or start a new run (--overwrite or another "
            "--out)")
    if kept:
        raise ValueError(
            f"resuming {out} with {changes(kept)}: a resume continues the checkpoint's learning rate (where the "
            "scheduler left it) and random state, so the new value would not be used; resume with the run's values, "
            "or start a new run (--overwrite or another --out)")


def _without_config_yaml(cfg: Config, out: Path, checkpoint: dict) -> Config:
    """A resumed run without config.yaml (started from Python): its learning rate and seed are the checkpoint's,
    which go on, and not the flags' or defaults' (config.yaml, written now, would record values not used)."""
    if (out / "config.yaml").is_file():
        return cfg
    settings = checkpoint.get("settings") or {}
    kept = {name: settings[name] for name in ("lr", "seed")
            if name in settings and settings[name] != getattr(cfg, name)}
    if kept:
        log.warning("%s has no config.yaml (a run started from Python): its %s go on from the checkpoint", out,
                 ", ".join(f"{name} {value!r}" for name, value in kept.items()))
        cfg = cfg.replace(**kept)
    return cfg


def _species_of(graphs) -> set:
    return {int(z) for g in graphs for z in g.species.unique().tolist()}


def _check_valid_species(cfg: Config, trained: set, valid_graphs) -> None:
    """ValueError naming the elements of the validation set that no training structure has (``trained``: the
    training set's): the model would know them (with a reference energy fitted on the training set alone: 0 eV) but
    never be trained on them."""
    only = sorted(_species_of(valid_graphs) - trained)
    if not only:
        return
    names = ", ".join(_symbols(only))
    if cfg.valid is not None:
        where = (f"the validation set {cfg.valid!r} contains {names}, which no structure of the training set "
                 f"{cfg.train!r} has")
        fix = f"add structures with {names} to the training set, or leave them out of the validation set"
    else:
        where = (f"the random --valid-fraction {cfg.valid_fraction} split of {cfg.train!r} (seed {cfg.seed}) put "
                 f"every structure with {names} into the validation set")
        fix = ("pass another --seed or --valid-fraction, give a validation file with --valid, or add structures "
               f"with {names} to the data")
    raise ValueError(f"{where}: the model would never be trained on {names} (its reference energy, fitted on the "
                     f"training set, would be 0 eV); {fix}")


def _pairs(pairs, first: str, second: str, shown: int = 5) -> str:
    text = ", ".join(f"{first} {k} = {second} {j}" for k, j in pairs[:shown])
    return text + (", ..." if len(pairs) > shown else "")


def _warn_duplicates(cfg: Config, graphs, train_graphs, valid_graphs) -> None:
    """Warnings for structures given twice: repeats in the training file count again in the loss (a file
    concatenated with itself, frames written twice), and validation structures that are also training structures
    make the validation loss, which picks the best model and stops the run, partly a training loss."""
    repeats = duplicate_structures(graphs)
    if repeats:
        log.warning("%s repeats %d structure(s) exactly (%s): each copy counts again in the training loss",
                    cfg.train, len(repeats), _pairs(repeats, "frame", "frame"))
    if not valid_graphs:
        return
    shared = duplicate_structures(train_graphs, valid_graphs)
    if not shared:
        return
    if cfg.valid is not None:
        where = (f"{len(shared)} structure(s) of the validation set {cfg.valid} are in the training set "
                 f"({_pairs(shared, 'frame', 'training frame')})")
    else:
        where = (f"the --valid-fraction split of {cfg.train} put {len(shared)} copies of training structures into "
                 "validation (its repeats, above)")
    log.warning("%s: the validation loss, which picks the best model and stops the run, is then partly on structures "
                "the model is trained on", where)


def _run(cfg: Config, out: Path, device: str, main: bool, given: Optional[set] = None):
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    require = tuple(n for n in ("energy", "forces") if getattr(cfg, f"{n}_key"))
    if not require:
        raise ValueError("energy_key and forces_key are both 'none': there is nothing to train on")

    checkpoint = RunFolder(out, write=False).load_checkpoint() if cfg.resume else None  # read once
    record = _read_data_record(out) if cfg.resume else None
    if cfg.resume:
        if cfg.init_model is not None:  # a fine-tuning run: its model options came from the initial model
            cfg = _resumed_fine_tune(cfg, given, checkpoint, out)
        _check_same_split(cfg, out)
        cfg = _without_config_yaml(cfg, out, checkpoint)
        _check_same_data(cfg, out, record)
    init = None
    if cfg.init_model is not None and not cfg.resume:  # before the data are read: the model's cutoff builds the graphs
        init, cfg = initial_model(cfg, given)
    dtype = getattr(torch, cfg.dtype)  # a fine-tuning run's: its initial model's unless given
    t0 = time.perf_counter()
    both = cfg.valid is not None and cfg.config_type_weights is not None  # a type in either file is no unknown type
    reading = (config_types_of_files(cfg.config_type_weights, f"{cfg.train} and {cfg.valid}") if both
               else contextlib.nullcontext())
    with reading:
        graphs = _read(cfg.train, cfg, require, dtype, training=True)
        read_valid = _read(cfg.valid, cfg, require, dtype) if cfg.valid is not None else None
    data_record = {"train": str(Path(cfg.train).resolve()), "train_sha256": file_sha256(cfg.train),
                   "frames": len(graphs), "valid": None, "valid_sha256": None, "valid_fraction": None, "seed": None,
                   "validation": None}  # for data.json
    if cfg.resume and record is not None:  # a fine-tuning run's initial model, recorded when it started
        data_record.update({k: record[k] for k in ("init_model", "init_model_sha256") if k in record})
    if cfg.valid is not None:
        train_graphs, valid_graphs = graphs, read_valid
        data_record.update(valid=str(Path(cfg.valid).resolve()), valid_sha256=file_sha256(cfg.valid))
    elif cfg.valid_fraction > 0 and len(graphs) >= 2:
        train_idx, valid_idx = _split_indices(graphs, cfg)
        if cfg.resume:
            train_idx, valid_idx = _recorded_split(cfg, out, record, len(graphs), train_idx, valid_idx)
        train_graphs, valid_graphs = [graphs[k] for k in train_idx], [graphs[k] for k in valid_idx]
        data_record.update(valid_fraction=cfg.valid_fraction, seed=cfg.seed, validation=valid_idx)
    else:
        train_graphs, valid_graphs = graphs, []
    _warn_duplicates(cfg, graphs, train_graphs, valid_graphs)
    present = _species_of(train_graphs)
    if cfg.init_model is None:  # an initial model was trained on its elements and keeps their reference energies
        _check_valid_species(cfg, present, valid_graphs)
    else:
        present |= _species_of(valid_graphs)
    present = sorted(present)  # the validation set's too (checked above for a new model)
    species = cfg.species or present
    missing = sorted(set(present) - set(species))
    if init is not None:  # an element new to the model is learnt from the training set, whatever --species says
        _check_valid_species(cfg, _species_of(train_graphs) | set(init.species), valid_graphs)
    if init is not None and cfg.add_elements:  # the model's elements, those given with --species, the data's
        species, missing = sorted(set(species) | set(missing)), []
    if missing and cfg.init_model is not None:
        raise ValueError(
            f"the data contain {', '.join(_symbols(missing))}, which the model in init_model {cfg.init_model!r} does "
            f"not know (its species: {', '.join(_symbols(species))}): pass --add-elements to add them to the model "
            "(trained from the new data), train a new model, or leave the structures with those elements out")
    if missing:
        raise ValueError(
            f"the data contain {', '.join(_symbols(missing))}, which are not in species {', '.join(_symbols(species))}"
        )
    log.info(
        "data: %d training and %d validation structures (%s), read in %.1f s",
        len(train_graphs), len(valid_graphs), ", ".join(_symbols(species)), time.perf_counter() - t0,
    )

    torch.manual_seed(cfg.seed)
    added = sorted(set(species) - set(init.species)) if init is not None else []
    if added:  # drawn after the seed, as a new model's weights
        init = init.with_species(species)
        log.info("added %s to the model: new embedding rows and per-element weights, initialised as a new model's",
                 ", ".join(_symbols(added)))
    try:
        model = (cfg.build_model(species) if init is None else init).to(device=device, dtype=dtype)
    except ImportError as err:
        raise ValueError(f"long_range={cfg.long_range!r} is not available in this installation ({err})") from None
    if init is not None:
        data_record.update(init_model=str(Path(cfg.init_model).resolve()),
                           init_model_sha256=file_sha256(cfg.init_model))
        if cfg.refit_reference_energies:
            refit_reference_energies(model, train_graphs)
        elif added and any(bool(g.has_energy.any()) for g in train_graphs):  # an added element's, fitted to the data
            refit_reference_energies(model, train_graphs, elements=added)
        elif added:
            log.warning("no training structure has an energy label: the reference energies of %s stay 0 eV",
                        ", ".join(_symbols(added)))

    if cfg.resume:  # a model that does not match is refused before the data statistics are computed
        restore_model_settings(model, checkpoint["model"], out)

    # the file records settings, not this call's actions; absolute paths work from any folder
    absolute = {n: str(Path(getattr(cfg, n)).resolve()) for n in ("train", "valid", "out", "init_model")
                if getattr(cfg, n)}

    def write_config():  # once train() has accepted the start: a refused start leaves the run's config.yaml as it was
        if main:
            header = "# cartlorem train: every option of this run (defaults included); reuse with --config\n"
            cfg.replace(species=species, resume=False, overwrite=False, **absolute).to_yaml(out / "config.yaml", header)
            # a split's validation frame indices (from 0, in file order; the other frames are training's)
            atomic_write_text(out / DATA_JSON, json.dumps(data_record, indent=1) + "\n")

    # statistics: a fresh model's are set from the data; an initial model keeps its own (its weights were trained
    # with them), and on resume the checkpoint's are restored
    result = train(model, train_graphs, valid_graphs, out_dir=out, on_start=write_config,
                   statistics=cfg.init_model is None, **cfg.train_kwargs())
    return model, result
