"""Irreducible Cartesian tensors of rank 0–2: harmonics, products, channel mixing, e3nn interop."""

from .chunked import chunked_edge_sum
from .fused import (compact_edge_product, compact_to_sym, compiled_compact_edge_product, compiled_weighted_edge_product,
                    edge_paths, sym_to_compact, weighted_edge_product)
from .harmonics import harmonics, stf
from .linear import EquivariantLinear, mix_channels
from .products import EVEN_PATHS, ODD_PATHS, PATHS, paths_to, product
from .spherical import from_spherical, to_spherical

__all__ = [
    "harmonics", "stf", "product", "paths_to", "EVEN_PATHS", "ODD_PATHS", "PATHS",
    "edge_paths", "weighted_edge_product", "compiled_weighted_edge_product", "compact_edge_product",
    "compiled_compact_edge_product", "sym_to_compact", "compact_to_sym", "EquivariantLinear", "mix_channels",
    "to_spherical", "from_spherical", "chunked_edge_sum",
]
