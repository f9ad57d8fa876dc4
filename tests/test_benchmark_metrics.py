"""The benchmark scripts' own metrics, on synthetic data with a known answer."""

import sys
from pathlib import Path

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
