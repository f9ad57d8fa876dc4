"""benchmarks/scale.py: how the long-range exponent is fitted from the rows of a run."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import scale  # noqa: E402


def _row(n, lr, full=None, lr_only=False):
    r = {"system": "water", "threads": 1, "status": "ok", "N": n, "lr_wall_s": lr, "lr_cpu_s": lr}
    if lr_only:
        r["lr_only"] = True
    else:
        r.update(full_wall_s=full, full_cpu_s=full)
    return r


def test_in_call_and_block_alone_are_fitted_as_separate_series():
    """Long range inside the calls ∝ N (exponent 1), the block alone in fresh processes ∝ N^1.3: the two
    series are fitted apart (mixing them gave neither), and the target reads the calls' series."""
    ns = [10_000, 30_000, 100_000]
    rows = [_row(n, 1e-4 * n, full=2e-3 * n) for n in ns] + [_row(n, 1e-4 * n**1.3, lr_only=True) for n in ns]
    s = scale.summarise(rows)
    assert s["fits"]["water 1t lr_cpu N>=1e4"] == pytest.approx(1.0, abs=1e-3)
    assert s["fits"]["water 1t lr_alone_cpu N>=1e4"] == pytest.approx(1.3, abs=1e-3)
    assert s["lr_exponent_max_N>=1e4"] == pytest.approx(1.0, abs=1e-3) and s["lr_exponent_target_met"]


def test_block_alone_decides_without_calls_across_the_range():
    """Calls at 10^4 and 2 x 10^4 only (no 10^5 call): no 10^4 - 10^5 fit from them; the block-alone series
    that spans the range decides the target."""
    rows = [_row(10_000, 1.0, full=20.0), _row(20_000, 2.0, full=40.0)]
    rows += [_row(n, 1e-4 * n**1.3, lr_only=True) for n in (10_000, 30_000, 100_000)]
    s = scale.summarise(rows)
    assert "water 1t lr_cpu N>=1e4" not in s["fits"] and "water 1t lr_cpu all" in s["fits"]
    assert s["lr_exponent_max_N>=1e4"] == pytest.approx(1.3, abs=1e-3) and not s["lr_exponent_target_met"]
