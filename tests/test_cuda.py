"""The model, the multipole sums and training on a CUDA device give what they give on the CPU.

Skipped where torch sees no CUDA device (CI has none): run on a GPU machine with
``python3 -m pytest tests/test_cuda.py`` (``benchmarks/gpu.sh`` does, before its benchmarks). Everything is in
float64, so the CPU result is the reference to 1e-9: the kernels differ (cuBLAS, cuFFT, atomic scatters), the
mathematics does not.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import bulk, molecule
from ase.calculators.singlepoint import SinglePointCalculator

from cartlorem import CartLorem
from cartlorem.data import read_dataset
from cartlorem.graph import collate

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

CUDA = torch.device("cuda")


def _labelled(atoms, seed):
    rng = np.random.default_rng(seed)
    atoms = atoms.copy()
    atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
    results = {"energy": float(rng.normal()) * len(atoms), "forces": rng.normal(size=(len(atoms), 3))}
    if atoms.pbc.all():
        results["stress"] = rng.normal(scale=0.01, size=6)
    atoms.calc = SinglePointCalculator(atoms, **results)
    return atoms


def _molecules():
    return [_labelled(molecule("H2O"), 0), _labelled(molecule("NH3"), 1), _labelled(molecule("CH3OH"), 2)]


def _crystal():
    nacl = bulk("NaCl", "rocksalt", a=5.64, cubic=True).repeat((2, 2, 2))
    return [_labelled(nacl, 3)]


def _slab():
    nacl = bulk("NaCl", "rocksalt", a=5.64, cubic=True).repeat((2, 2, 1))
    nacl.center(vacuum=8.0, axis=2)
    nacl.pbc = [True, True, False]
    atoms = nacl.copy()
    atoms.calc = SinglePointCalculator(atoms, energy=0.0, forces=np.zeros((len(atoms), 3)))
    return [atoms]


def _model(structures, long_range, **kw):
    species = sorted({int(z) for a in structures for z in a.numbers})
    torch.manual_seed(0)
    model = CartLorem(species, cutoff=4.0, channels=8, long_range=long_range, **kw).double()
    with torch.no_grad():  # nonzero everywhere, so that every path carries a value
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _close(a, b, rtol=1e-9):
    a, b = a.detach().cpu(), b.detach().cpu()
    scale = float(b.abs().max()) + 1e-300
    return float((a - b).abs().max()) <= rtol * scale


@pytest.mark.parametrize("system, long_range, method", [
    ("molecules", None, None),
    ("molecules", "multipole", None),
    ("molecules", "lorem", None),
    ("crystal", "multipole", "ewald"),
    ("crystal", "multipole", "pme"),
    ("slab", "multipole", None),
])
def test_model_on_cuda_equals_cpu(system, long_range, method, monkeypatch):
    """Energy, forces and (periodic) stress of one model on both devices, long-range sums included: the
    open-molecule pair sum, Ewald and PME (cuFFT) in a periodic cell, and the slab sum."""
    import cartlorem.nn.long_range as lr

    if method is not None:  # the block's sum with this method instead of "auto"
        fields = lr.batched_multipole_fields
        monkeypatch.setattr(lr, "batched_multipole_fields", lambda *a, **k: fields(*a, **k, method=method))
    structures = {"molecules": _molecules, "crystal": _crystal, "slab": _slab}[system]()
    batch = collate(read_dataset(structures, cutoff=4.0, require=()))
    model = _model(structures, long_range).eval()
    periodic = system == "crystal"
    ref = model(batch, compute_forces=True, compute_stress=periodic)
    model_gpu = model.to(CUDA)
    out = model_gpu(batch.to(device=CUDA), compute_forces=True, compute_stress=periodic)
    assert out["energy"].device.type == "cuda"
    for key in ("energy", "forces") + (("stress",) if periodic else ()):
        assert _close(out[key], ref[key]), key


def test_multipole_fields_on_cuda_equal_cpu():
    """multipole_fields (potential, field, field gradient) and the forces through them on both devices, for each
    periodic method."""
    from cartlorem.ewald import multipole_fields

    rng = np.random.default_rng(0)
    n, c = 40, 3
    cell = 9.0 * np.eye(3) + rng.uniform(-0.5, 0.5, (3, 3))
    pos = rng.uniform(0, 1, (n, 3)) @ cell
    q = rng.normal(size=(n, c))
    mu = 0.3 * rng.normal(size=(n, c, 3))
    th = rng.normal(size=(n, c, 3, 3)) * 0.1
    th = th + np.swapaxes(th, -1, -2)
    th -= np.trace(th, axis1=-2, axis2=-1)[..., None, None] / 3 * np.eye(3)
    for method in ("ewald", "pme"):
        res = []
        for device in ("cpu", CUDA):
            t = {k: torch.tensor(v, dtype=torch.float64, device=device) for k, v in
                 dict(pos=pos, q=q, mu=mu, th=th, cell=cell).items()}
            t["pos"].requires_grad_(True)
            f = multipole_fields(t["pos"], t["q"], t["mu"], t["th"], t["cell"], [True] * 3, smearing=1.0,
                                 accuracy=1e-8, method=method)
            e = 0.5 * ((t["q"] * f.potential).sum() - (t["mu"] * f.field).sum()
                       - 0.5 * (t["th"] * f.field_gradient).sum())
            (g,) = torch.autograd.grad(e, [t["pos"]])
            res.append((f.potential, f.field, f.field_gradient, g))
        for a, b in zip(res[1], res[0]):
            assert _close(a, b), method


@pytest.mark.parametrize("long_range", [None, "multipole"])
def test_training_on_cuda_equals_cpu(long_range, tmp_path):
    """Two epochs of ``train`` on a model placed on the GPU follow the CPU run: the same validation losses and
    weights (float64; the batch order is seeded)."""
    from cartlorem.training import train

    structures = _molecules() * 3
    graphs = read_dataset(structures, cutoff=4.0, require=())
    results = []
    for k, device in enumerate(("cpu", CUDA)):
        model = _model(structures, long_range).to(device)
        res = train(model, graphs[:6], graphs[6:], epochs=2, batch_size=3, out_dir=str(tmp_path / f"run{k}"),
                    seed=0, progress=False)
        results.append((res.history, {k: v.detach().cpu() for k, v in model.state_dict().items()}))
    (h_cpu, w_cpu), (h_gpu, w_gpu) = results
    assert [r["valid_loss"] for r in h_gpu] == pytest.approx([r["valid_loss"] for r in h_cpu], rel=1e-8)
    for k in w_cpu:
        if w_cpu[k].is_floating_point():
            assert _close(w_gpu[k], w_cpu[k], 1e-7), k


def test_calculator_on_cuda_equals_cpu():
    """The ASE calculator with ``device="cuda"``: energy and forces as on the CPU."""
    from cartlorem import CartLoremCalculator

    structures = _molecules()
    model = _model(structures, "multipole").eval()
    atoms = structures[2].copy()
    out = {}
    for device in ("cpu", "cuda"):
        atoms.calc = CartLoremCalculator(model, device=device, dtype="float64")
        out[device] = (atoms.get_potential_energy(), atoms.get_forces())
    assert out["cuda"][0] == pytest.approx(out["cpu"][0], rel=1e-10)
    np.testing.assert_allclose(out["cuda"][1], out["cpu"][1], rtol=1e-8, atol=1e-10)
