"""Units and constants. cartlorem works in eV, Å and the elementary charge e."""

COULOMB = 14.399645  # eV·Å/e², e²/(4πε₀)

__all__ = ["COULOMB"]
