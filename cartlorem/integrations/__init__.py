"""Thin adapters that let MD engines drive a CartLorem model (one adapter per engine, no model logic).

- :mod:`cartlorem.integrations.torchsim`: a torch-sim ``ModelInterface`` (batched MD, GPU).
- :mod:`cartlorem.integrations.ipi`: serve a model to i-PI over its socket protocol (ASE's client).
- :mod:`cartlorem.integrations.lammps`: LAMMPS ``fix external``: atoms gathered from all MPI ranks,
  the model evaluated once on rank 0, forces, energy and virial scattered back by atom ID.
- :mod:`cartlorem.integrations.common`: arrays (batched or single structure) → :class:`cartlorem.graph.Graph`;
  needs none of the engines.

Each engine is an optional dependency: the adapters import without it, and raise an ImportError that
names the package to install when the engine itself is needed.
"""
