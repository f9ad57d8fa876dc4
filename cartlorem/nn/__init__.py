"""Learnable building blocks: radial basis, interaction and product blocks, long-range block."""

from .blocks import BodyOrderProduct, Interaction, SpeciesLinear
from .radial import BesselBasis, PolynomialEnvelope, RadialMLP

__all__ = ["BesselBasis", "PolynomialEnvelope", "RadialMLP", "Interaction", "BodyOrderProduct", "SpeciesLinear"]
