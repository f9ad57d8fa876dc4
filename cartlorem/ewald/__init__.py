"""Cartesian multipole electrostatics (no learnable parameters).

Point or Gaussian-smeared charges, dipoles and traceless quadrupoles per channel -> potential, field and
field gradient at every atom (open boundaries: exact direct sum; periodic: Ewald), and their energy.
Layout: :mod:`.kernels` says what is summed (radial kernels, interaction tensors, reciprocal kernel,
self and background terms); :mod:`.direct` and :mod:`.ewald` say how.
"""

from .fields import MultipoleFields, batched_multipole_fields, electrostatic_energy, multipole_fields

__all__ = ["MultipoleFields", "multipole_fields", "electrostatic_energy", "batched_multipole_fields"]
