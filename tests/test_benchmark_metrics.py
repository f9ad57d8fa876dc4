"""The benchmark scripts' own metrics, on synthetic data with a known answer."""

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project: benchmarks is a package
from benchmarks import nacl_profile  # noqa: E402


def synthetic(rng, n=300, far=lambda d: 0.03 * d ** 2):
    """Na9/Na8-like frames: a shared profile, a cluster offset, the far term on Na9 only, rattle noise."""
    d = rng.uniform(-0.6, 2.5, n)
    cluster = np.where(rng.random(n) < 0.5, "Na9Cl8+", "Na8Cl8+")
    noise = rng.normal(0.0, 0.1, n)
    e = 0.3 * d + 0.1 * d ** 3 + noise + np.where(cluster == "Na9Cl8+", 5.0 + far(d), 0.0)
    return d, cluster, e, noise


def test_profile_difference_recovers_the_far_term():
    rng = np.random.default_rng(0)
    d, cluster, e, noise = synthetic(rng)
    # the rattle noise is in reference and prediction alike: the fit of the difference is exact
    exact = nacl_profile.profile_difference(d, cluster, e - noise)
    np.testing.assert_allclose(exact, 0.03 * nacl_profile.GRID ** 2, atol=1e-10)


def test_score_sees_a_model_that_misses_the_far_term():
    rng = np.random.default_rng(1)
    d, cluster, e_ref, noise = synthetic(rng)
    blind = e_ref - np.where(cluster == "Na9Cl8+", 0.03 * d ** 2, 0.0)  # same noise, far term missing
    good = e_ref + rng.normal(0.0, 0.005, len(d))
    s_blind = nacl_profile.score(d, cluster, blind, e_ref)
    s_good = nacl_profile.score(d, cluster, good, e_ref)
    np.testing.assert_allclose(s_blind["end_error_mev"], -1000 * 0.03 * 2.4 ** 2, rtol=1e-8)
    assert s_good["rms_error_mev"] < 3.0 < s_blind["rms_error_mev"] / 10


def test_too_few_frames_of_a_cluster_is_an_error():
    d = np.linspace(0, 2, 10)
    cluster = np.array(["Na9Cl8+"] * 8 + ["Na8Cl8+"] * 2)
    with pytest.raises(ValueError, match="too few"):
        nacl_profile.profile_difference(d, cluster, d)


def test_force_error_decomposition_is_exact_and_orthogonal():
    """force_decomposition.decompose: per monomer, the uniform part is the net force error spread evenly
    (it sums to the net error), the internal part sums to zero, and the two are orthogonal (MSEs add up)."""
    from ase import Atoms

    from benchmarks.force_decomposition import decompose

    rng = np.random.default_rng(0)
    frames = []
    for n, na in ((5, 2), (7, 4), (3, 1)):
        a = Atoms("H" * n, positions=rng.normal(size=(n, 3)))
        a.info["monomer_a_atoms"] = na
        frames.append(a)
    n_atoms = sum(len(a) for a in frames)
    ref, pred = rng.normal(size=(n_atoms, 3)), rng.normal(size=(n_atoms, 3))
    err, uniform, internal = decompose(frames, SimpleNamespace(forces_pred=pred, forces_ref=ref))
    np.testing.assert_allclose(err, 1000.0 * (pred - ref))
    np.testing.assert_allclose(uniform + internal, err)
    start = 0
    for a in frames:
        for lo, hi in ((0, a.info["monomer_a_atoms"]), (a.info["monomer_a_atoms"], len(a))):
            block = slice(start + lo, start + hi)
            np.testing.assert_allclose(uniform[block].sum(0), err[block].sum(0))  # the net error
            np.testing.assert_allclose(uniform[block], uniform[block][:1].repeat(hi - lo, 0))  # even
            np.testing.assert_allclose(internal[block].sum(0), 0.0, atol=1e-9)
        start += len(a)
    np.testing.assert_allclose((err ** 2).sum(), (uniform ** 2).sum() + (internal ** 2).sum())
