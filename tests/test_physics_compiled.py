"""The compiled training step's gradients (cartlorem.training.compiled, the function that is compiled, run eagerly)
against the eager step's, where the two once differed."""

import numpy as np
import torch
from ase.build import molecule
from ase.calculators.singlepoint import SinglePointCalculator

from cartlorem import CartLorem
from cartlorem.data import read_dataset
from cartlorem.graph import collate
from cartlorem.training.compiled import CompiledLossGradient
from cartlorem.training.loss import loss_weights, weighted_loss
from conftest import needs_compiled_step  # noqa: E402  (tests/ is on sys.path under pytest)


def _batch(rng, charges):
    structures = []
    for name, charge in zip(("H2O", "NH3"), charges):
        a = molecule(name)
        a.positions += rng.normal(scale=0.05, size=a.positions.shape)
        a.info["total_charge"] = charge
        a.calc = SinglePointCalculator(a, energy=float(rng.normal()), forces=rng.normal(size=(len(a), 3)))
        structures.append(a)
    return collate(read_dataset(structures, cutoff=3.5, require=()))


@needs_compiled_step
def test_charge_state_weights_move_on_neutral_batches_as_in_the_eager_step():
    """On a batch of neutral singlets the conditioning's input is 0 and so is its gradient, exactly: autograd gives
    zeros (the energy depends on it), and Adam moves it by its momentum. The functional step gave None there, as for
    a parameter the loss does not depend on, so Adam skipped it: after a charged batch and a neutral one the
    conditioning's weights of a compiled run were not those of an eager run."""
    rng = np.random.default_rng(0)
    batches = [_batch(rng, (1.0, -1.0)), _batch(rng, (0.0, 0.0))]
    weights = loss_weights({})
    runs = []
    for functional in (False, True):
        torch.manual_seed(0)
        model = CartLorem([1, 7, 8], cutoff=3.5, long_range=None, channels=4, num_layers=2, correlation=2,
                          radial_hidden=8, charge_state=True).double().train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=1e-2, foreach=False)
        step = CompiledLossGradient(model, weights)
        step._fn = step._loss_and_grad  # the function that is compiled, without torch.compile
        grads = []
        for batch in batches:
            opt.zero_grad(set_to_none=True)
            if functional:
                step(batch)
            else:
                loss, _ = weighted_loss(model(batch, compute_forces=True, create_graph=True), batch, weights)
                torch.autograd.backward(loss, inputs=params)
            grads.append({n: p.grad is None for n, p in model.named_parameters()})
            opt.step()
        runs.append((grads, {n: p.detach().clone() for n, p in model.named_parameters()}))
    (grads_e, state_e), (grads_f, state_f) = runs
    assert grads_f == grads_e  # None exactly where autograd gives none
    assert not any(grads_e[1][n] for n in grads_e[1] if n.startswith("conditioning."))
    for n in state_e:
        torch.testing.assert_close(state_f[n], state_e[n], rtol=1e-10, atol=1e-12, msg=n)
