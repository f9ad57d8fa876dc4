"""A trained model as a metatomic ``AtomisticModel``: it then runs wherever metatomic models run
(metatomic's ASE calculator, LAMMPS with metatomic, i-PI, torch-sim, ...).

    pip install metatomic-torch metatomic-ase

    from cartlorem.integrations.metatomic import save_metatomic
    save_metatomic("run/model.pt", "model-mta.pt")        # or: cartlorem export run/model.pt model-mta.pt --metatomic

    from metatomic_ase import MetatomicCalculator
    atoms.calc = MetatomicCalculator("model-mta.pt")

The metatomic model wraps :class:`cartlorem.export.ExportedCartLorem` (the TorchScript form of the
model; what it supports and refuses is said there): it asks the engine for a full, strict neighbour
list at the model's cutoff, turns the systems and their neighbour lists into one cartlorem batch and
returns the "energy" output (eV; per structure, or per atom when the engine asks for it). Forces and
stress are the engine's gradients of that energy with respect to positions and cell (the pair vectors
are built from them). Units: Å, eV. metatomic systems carry no net charge, so every structure is
neutral here (a long-range model's charges sum to 0); charged structures need
:class:`cartlorem.CartLoremCalculator`. ``selected_atoms`` must name every atom of every system (LAMMPS
passes it at every step, on one MPI rank too); a part of them (domain decomposition) is refused: the
long-range sums need every atom, and a local model would need ghost-atom handling.
"""

import math  # no ``from __future__ import annotations``: metatomic checks the forward's annotations as types
import os
from typing import Dict, List, Optional

import torch

__all__ = ["MetatomicCartLorem", "metatomic_model", "save_metatomic"]


def _import_metatomic():
    try:
        from metatensor.torch import Labels, TensorBlock, TensorMap
        from metatomic.torch import (AtomisticModel, ModelCapabilities, ModelMetadata, ModelOutput,
                                     NeighborListOptions, System)
    except ImportError as err:
        raise ImportError(f"the metatomic wrapper needs `pip install metatomic-torch` ({err})") from None
    return Labels, TensorBlock, TensorMap, AtomisticModel, ModelCapabilities, ModelMetadata, ModelOutput, \
        NeighborListOptions, System


try:  # the annotations of the scripted forward need the metatomic types at import time
    from metatensor.torch import Labels, TensorBlock, TensorMap
    from metatomic.torch import ModelOutput, NeighborListOptions, System
except ImportError:  # the module still imports; metatomic_model() says what is missing
    Labels = TensorBlock = TensorMap = ModelOutput = NeighborListOptions = System = None


class MetatomicCartLorem(torch.nn.Module):
    """metatomic ``ModelInterface`` around :class:`cartlorem.export.ExportedCartLorem` (see the module docstring)."""

    def __init__(self, model):
        super().__init__()
        from ..export import ExportedCartLorem

        _import_metatomic()
        self.model = ExportedCartLorem(model)
        self.neighbors = NeighborListOptions(cutoff=float(model.cutoff), full_list=True, strict=True,
                                             requestor="cartlorem")

    def requested_neighbor_lists(self) -> List[NeighborListOptions]:
        return [self.neighbors]

    def forward(self, systems: List[System], outputs: Dict[str, ModelOutput],
                selected_atoms: Optional[Labels] = None) -> Dict[str, TensorMap]:
        device = systems[0].positions.device
        if selected_atoms is not None:  # engines pass it even when it names every atom (LAMMPS does, on one rank)
            sizes = torch.tensor([s.positions.shape[0] for s in systems], dtype=torch.long, device=device)
            starts = torch.cumsum(sizes, 0) - sizes
            flat = starts[selected_atoms.column("system").long()] + selected_atoms.column("atom").long()
            named = torch.zeros(int(sizes.sum()), dtype=torch.bool, device=device).index_fill(0, flat, True)
            if not bool(named.all()):
                raise ValueError(
                    f"selected_atoms names {int(named.sum())} of the {named.shape[0]} atoms: cartlorem models compute "
                    "every atom of each system (no domain decomposition: the long-range sums need every atom, and a "
                    "local model would need ghost-atom handling); select them all, or run on one MPI rank")
        results: Dict[str, TensorMap] = {}
        if "energy" not in outputs:
            return results
        positions, types, cells, pbcs, batch, edges, shifts = [], [], [], [], [], [], []
        offset = 0
        for k, system in enumerate(systems):
            n = system.positions.shape[0]
            pairs = system.get_neighbor_list(self.neighbors)
            samples = pairs.samples.values  # [E, 5]: first_atom, second_atom, cell_shift_a/b/c
            edges.append(samples[:, :2].T + offset)  # (centre i, neighbour j): cartlorem's edge_index
            shifts.append(samples[:, 2:5])
            positions.append(system.positions)
            types.append(system.types)
            cells.append(system.cell)
            pbcs.append(system.pbc)
            batch.append(torch.full((n,), k, dtype=torch.long, device=device))
            offset += n
        batch_t = torch.cat(batch)
        out = self.model.energy(torch.cat(positions), torch.cat(types).long(), torch.stack(cells), torch.stack(pbcs),
                                torch.cat(edges, dim=1).long(), torch.cat(shifts).to(systems[0].positions.dtype),
                                batch_t, torch.zeros(len(systems), dtype=systems[0].positions.dtype, device=device))
        request = outputs["energy"]
        energy_props = Labels(["energy"], torch.tensor([[0]], device=device))
        if request.per_atom:
            atoms = torch.cat([torch.arange(s.positions.shape[0], device=device) for s in systems])
            samples = Labels(["system", "atom"], torch.stack([batch_t, atoms], dim=1).to(torch.int32))
            values = out["node_energy"][:, None]
        else:
            samples = Labels(["system"], torch.arange(len(systems), device=device, dtype=torch.int32)[:, None])
            values = out["energy"][:, None]
        block = TensorBlock(values=values, samples=samples, components=[], properties=energy_props)
        results["energy"] = TensorMap(Labels(["_"], torch.tensor([[0]], device=device)), [block])
        return results


def metatomic_model(model, *, name: str = "cartlorem model", description: str = ""):
    """A metatomic ``AtomisticModel`` of ``model`` (a CartLorem or a model file path), in eval mode.

    Capabilities: output "energy" (eV, per structure or per atom), the model's species, length unit Å,
    the model's dtype, interaction range: cutoff × layers for local models, infinite for long-range ones.
    """
    import copy

    (_, _, _, AtomisticModel, ModelCapabilities, ModelMetadata, ModelOutput_, _, _) = _import_metatomic()
    if isinstance(model, (str, os.PathLike)):
        from ..model import load_model

        model = load_model(model)
    model = copy.deepcopy(model).eval()
    dtype = str(model.dtype).replace("torch.", "")
    interaction = math.inf if model.long_range is not None else model.cutoff * len(model.layers)
    capabilities = ModelCapabilities(
        outputs={"energy": ModelOutput_(unit="eV", sample_kind="atom")},
        atomic_types=list(model.species),
        interaction_range=float(interaction),
        length_unit="angstrom",
        supported_devices=["cpu", "cuda"],
        dtype=dtype,
    )
    metadata = ModelMetadata(name=name, description=description or
                             f"cartlorem {model.long_range or 'local'} model, cutoff {model.cutoff} Å")
    return AtomisticModel(MetatomicCartLorem(model).eval(), metadata, capabilities)


def save_metatomic(model, path, **kwargs) -> None:
    """Write ``model`` (a CartLorem or a model file path) as a metatomic model file (``AtomisticModel.save``).

    As :func:`cartlorem.export.save_exported`: the file is written atomically (a failure leaves a file already at
    ``path`` as it was), its folder is made when missing, and a folder as ``path`` is refused.
    """
    import shutil
    import tempfile

    from ..fileio import atomic_write

    path = os.fspath(path)
    if os.path.isdir(path):
        example = os.path.join(path, "model-mta.pt")
        raise ValueError(f"{path} is a folder: give the metatomic model a file name (e.g. {example})")
    atomistic = metatomic_model(model, **kwargs)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tmp-", dir=folder) as staging:
        staged = os.path.join(staging, "model.pt")
        atomistic.save(staged)  # metatomic writes to a path only: stage it there, then copy it into place atomically
        with open(staged, "rb") as src:
            atomic_write(path, lambda f: shutil.copyfileobj(src, f))
