"""Cartesian multipole electrostatics (no learnable parameters).

Point or Gaussian-smeared charges, dipoles and traceless quadrupoles per channel -> potential, field and
field gradient at every atom (open boundaries: exact direct sum; periodic: Ewald or particle-mesh
Ewald, chosen by ``method="auto"``), and their energy.
Layout: :mod:`.kernels` says what is summed (radial kernels, interaction tensors, reciprocal kernel,
self and background terms); :mod:`.direct`, :mod:`.ewald` and :mod:`.pme` say how; :mod:`.cells` sums a batch of
periodic cells in one traced function (the compiled training step).
"""

from .fields import MultipoleFields, batched_multipole_fields, electrostatic_energy, multipole_fields
from .pme import METHODS

__all__ = ["MultipoleFields", "multipole_fields", "electrostatic_energy", "batched_multipole_fields", "METHODS"]
