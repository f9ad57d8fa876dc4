"""train(): data that do not fit the model are refused before the first step."""

import pytest
import torch

from cartlorem import CartLorem
from cartlorem.data import read_dataset
from cartlorem.training import check_dataset, train
from conftest import emt_frames  # noqa: E402  (tests/ is on sys.path under pytest)


def tiny_model(cutoff=3.0):
    torch.manual_seed(0)
    return CartLorem([29, 47], cutoff=cutoff, long_range=None, channels=4, num_layers=1, correlation=1,
                     num_basis=4, radial_hidden=4, readout_hidden=4).double()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_graphs_read_with_a_smaller_cutoff_are_refused(dtype):
    frames = emt_frames(6, seed=0)
    short = read_dataset(frames, 2.6, dtype=dtype)  # neighbours between 2.6 and 3.0 Å are missing
    model = tiny_model(3.0).to(dtype)
    with pytest.raises(ValueError, match=r"training structure 0 .* smaller cutoff.*cutoff=model\.cutoff"):
        train(model, short, epochs=1, progress=False)
    with pytest.raises(ValueError, match=r"validation structure 0 .* smaller cutoff"):
        train(model, read_dataset(frames, 3.0, dtype=dtype), short, epochs=1, progress=False)
    check_dataset(model, read_dataset(frames, 3.0, dtype=dtype), "training")  # the model's own cutoff passes


def test_training_set_without_edges_names_the_cutoff():
    model = tiny_model(0.5)  # a cutoff in nm by mistake: no two atoms are this close
    graphs = read_dataset(emt_frames(4, seed=0), 0.5)
    with pytest.raises(ValueError, match=r"no two atoms .* within the cutoff 0\.5 Å"):
        train(model, graphs, epochs=1, progress=False)
