"""Model files: plain data read with torch.load(weights_only=True); pickled code is refused unless the
caller opts in (trust_pickle=True); files written by cartlorem 0.1.0 keep their predictions."""


import importlib.util

import numpy as np
import pytest
import torch
from ase.build import molecule

import cartlorem
from cartlorem.graph import atoms_to_graph
from conftest import needs_torch  # noqa: E402  (tests/ is on sys.path under pytest)

pytestmark = pytest.mark.usefixtures("one_thread")


def lr_model(seed=0):
    torch.manual_seed(seed)
    model = cartlorem.CartLorem([1, 6, 8], cutoff=4.0, long_range="multipole", channels=8, num_layers=1,
                                correlation=2, num_basis=4, radial_hidden=8, readout_hidden=8).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.set_statistics(atomic_energies={1: -13.6, 6: -1030.0, 8: -2040.0}, avg_num_neighbors=7.5, scale=2.5,
                         shift=0.1)
    return model.eval()


def methanol():
    a = molecule("CH3OH")
    a.rattle(0.05, seed=1)
    return a


def energy_forces(model, atoms):
    out = model(atoms_to_graph(atoms, model.cutoff), create_graph=False)
    return float(out["energy"].detach()), out["forces"].detach().numpy()


def old_layout_state(model):
    """The state dict in the v1/v2 layout: all couplings in one parameter "long_range_block.coupling" [C]."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k != "_extra_state"}  # (later)
    a0 = state.pop("long_range_block.coupling_channel0")
    state["long_range_block.coupling"] = torch.cat([a0.reshape(1), state.pop("long_range_block.coupling_others")])
    return state


def save_like_0_1_0(model, path, format="cartlorem-model-v1", **extra):
    """What cartlorem 0.1.0's save_model wrote: torch.save of this dict (its full pickle was allowed)."""
    torch.save({"format": format, "config": model.config, "state_dict": old_layout_state(model),
                "dtype": str(model.dtype).replace("torch.", ""), **extra}, path)


def _leave_mark(path):
    with open(path, "w") as f:
        f.write("pickled code ran")
    return "payload"


class _Callable:
    """Unpickling this runs _leave_mark: stands for any code a model file could smuggle in."""

    def __init__(self, mark):
        self.mark = mark

    def __reduce__(self):
        return (_leave_mark, (self.mark,))


def test_saved_file_is_plain_data(tmp_path):
    model = lr_model()
    cartlorem.save_model(model, tmp_path / "m.pt", training={"epoch": 3, "loss": 0.25, "curve": [1.0, 0.5]})
    obj = torch.load(tmp_path / "m.pt", weights_only=True)  # the strict reader accepts the whole file
    assert obj["format"] == "cartlorem-model-v5" and obj["training"]["curve"] == [1.0, 0.5]
    loaded = cartlorem.load_model(tmp_path / "m.pt")
    assert energy_forces(loaded, methanol())[0] == pytest.approx(energy_forces(model, methanol())[0], rel=1e-14)


def test_saved_file_is_world_readable_like_every_other_output(tmp_path):
    """save_model writes through the one atomic-write helper (cartlorem.fileio): mode 0666 & ~umask, not
    the 0600 of a bare temporary file (failed before: 0o600)."""
    import os

    cartlorem.save_model(lr_model(), tmp_path / "m.pt")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "m.pt").stat().st_mode & 0o777 == 0o666 & ~umask


def test_save_refuses_objects_that_need_pickle(tmp_path):
    model = lr_model()
    with pytest.raises(ValueError, match=r"\['training'\]\['loss'\] is a numpy.float64.*plain data"):
        cartlorem.save_model(model, tmp_path / "m.pt", training={"loss": np.float64(0.25)})
    assert not (tmp_path / "m.pt").exists()


def test_pickled_callable_is_refused(tmp_path):
    model = lr_model()
    mark = tmp_path / "mark"
    path = tmp_path / "evil.pt"
    payload = cartlorem.model.model_payload(model)
    payload["hook"] = _Callable(str(mark))
    torch.save(payload, path)
    with pytest.raises(ValueError, match=r"refusing to load .*pickled Python object .*_leave_mark.*trust_pickle=True"):
        cartlorem.load_model(path)
    assert not mark.exists()  # nothing in the file ran
    # the calculator opens paths the same way
    with pytest.raises(ValueError, match="refusing to load"):
        cartlorem.CartLoremCalculator(str(path))
    assert not mark.exists()


def test_old_format_files_load_with_their_0_1_0_predictions(tmp_path):
    """A 0.1.0 file (format v1: the energy scale also multiplied the electrostatic energy) predicts
    what it predicted under 0.1.0: E_old(s) = s × learned + (shift + E0) + s × electrostatic."""
    model = lr_model()
    atoms = methanol()
    save_like_0_1_0(model, tmp_path / "old.pt")
    loaded = cartlorem.load_model(tmp_path / "old.pt")  # plain data: no opt-in needed

    # the 0.1.0 numbers from today's model with the same weights, split by the scale dependence
    s = float(model.scale)
    e1, f1 = energy_forces(model, atoms)  # = s·A + B + e (A: learned readouts, B: shift + E0, e: electrostatic)
    model.set_statistics(scale=0.0)
    e0, f0 = energy_forces(model, atoms)  # = B + e
    b = 0.1 * len(atoms) + float(model.atomic_energies[model.species_index(torch.tensor(atoms.numbers))].sum())
    e_old = (e1 - e0) + b + s * (e0 - b)
    f_old = (f1 - f0) + s * f0
    assert abs(e0 - b) > 1e-3  # the electrostatic part is really there (else the test could not fail)
    e, f = energy_forces(loaded, atoms)
    # the couplings are converted in float64 from the stored weights: equal to rounding
    assert e == pytest.approx(e_old, rel=1e-12)
    assert np.allclose(f, f_old, rtol=1e-10, atol=1e-10)
    assert torch.allclose(loaded.long_range_block.coupling, s * model.long_range_block.coupling)
    assert float(loaded.long_range_block.coupling_channel0) == s  # kept: this model's charges are in old units


def test_v2_file_with_a_trained_channel_zero_coupling_keeps_it(tmp_path):
    """A v2 file (one coupling parameter, a_0 trained away from 1) loads with that a_0 and predicts exactly
    what the same weights predict; the fixed a_0 = 1 of new models does not overwrite it."""
    torch.manual_seed(1)
    model = cartlorem.CartLorem([1, 6, 8], cutoff=4.0, long_range="multipole", channels=8, num_layers=1,
                                correlation=2, num_basis=4, radial_hidden=8, readout_hidden=8,
                                long_range_options={"lr_channels": 3}).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        model.long_range_block.coupling_channel0.fill_(0.69)  # as measured after training (charge_units.py)
    model.set_statistics(scale=2.5, shift=0.1)
    model.eval()
    save_like_0_1_0(model, tmp_path / "v2.pt", format="cartlorem-model-v2")
    loaded = cartlorem.load_model(tmp_path / "v2.pt")
    assert float(loaded.long_range_block.coupling_channel0) == 0.69
    torch.testing.assert_close(loaded.long_range_block.coupling, model.long_range_block.coupling, rtol=0, atol=0)
    atoms = methanol()
    e, f = energy_forces(loaded, atoms)
    e_ref, f_ref = energy_forces(model, atoms)
    assert e == pytest.approx(e_ref, rel=1e-14) and np.allclose(f, f_ref, rtol=1e-12, atol=1e-13)
    # the same weights with a_0 = 1 predict something else: the test sees the stored a_0
    with torch.no_grad():
        model.long_range_block.coupling_channel0.fill_(1.0)
    assert abs(energy_forces(model, atoms)[0] - e) > 1e-4
    # and a newly saved model is v3 and round-trips a_0
    cartlorem.save_model(loaded, tmp_path / "v3.pt")
    again = cartlorem.load_model(tmp_path / "v3.pt")
    assert float(again.long_range_block.coupling_channel0) == 0.69 and energy_forces(again, atoms)[0] == e


def test_old_file_with_pickled_objects_needs_the_opt_in(tmp_path):
    """0.1.0's save_model stored any extra object; such a file loads only with trust_pickle=True."""
    model = lr_model()
    plain, pickled = tmp_path / "plain.pt", tmp_path / "pickled.pt"
    save_like_0_1_0(model, plain)
    save_like_0_1_0(model, pickled, training={"valid_loss": np.float64(0.25), "curve": np.arange(3.0)})
    with pytest.raises(ValueError, match=r"numpy.*trust_pickle=True"):
        cartlorem.load_model(pickled)
    loaded = cartlorem.load_model(pickled, trust_pickle=True)
    reference = cartlorem.load_model(plain)
    atoms = methanol()
    assert energy_forces(loaded, atoms)[0] == energy_forces(reference, atoms)[0]


def test_unreadable_files(tmp_path):
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="damaged, not a cartlorem model"):
        cartlorem.load_model(bad)
    with pytest.raises(ValueError, match="corrupt or not a cartlorem model"):
        cartlorem.load_model(bad, trust_pickle=True)
    torch.save({"format": "something-else", "weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a cartlorem model file"):
        cartlorem.load_model(tmp_path / "other.pt")
    payload = cartlorem.model.model_payload(lr_model())
    payload["config"]["frobnicate"] = 3
    torch.save(payload, tmp_path / "future.pt")
    with pytest.raises(ValueError, match="frobnicate"):
        cartlorem.load_model(tmp_path / "future.pt")


def _flip_a_bit_in(path, record_suffix):
    """Flip one bit in the middle of the data of the zip record whose name ends with ``record_suffix`` (the
    archive's structure stays intact: only that record's checksum no longer matches)."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(record_suffix))
    raw = bytearray(open(path, "rb").read())
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    raw[start + info.compress_size // 2] ^= 0x04
    open(path, "wb").write(bytes(raw))


def test_a_file_damaged_on_disk_is_refused(tmp_path):
    """torch.load does not check the checksums torch.save writes: a flipped bit in a stored weight loaded as a wrong
    number, with no error."""
    import zipfile

    path = tmp_path / "model.pt"
    model = lr_model()
    cartlorem.save_model(model, path)
    with zipfile.ZipFile(path) as archive:
        biggest = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    _flip_a_bit_in(path, biggest.filename)
    with pytest.raises(ValueError, match=r"damaged.*" + biggest.filename.split("/")[-1]):
        cartlorem.load_model(path)


def test_newer_format_and_mismatched_weights_are_named(tmp_path):
    payload = cartlorem.model.model_payload(lr_model())
    torch.save({**payload, "format": "cartlorem-model-v9"}, tmp_path / "newer.pt")
    with pytest.raises(ValueError, match="newer cartlorem"):
        cartlorem.load_model(tmp_path / "newer.pt")
    state = dict(payload["state_dict"])
    state.pop(next(iter(state)))
    torch.save({**payload, "state_dict": state}, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="weights in the file do not fit"):
        cartlorem.load_model(tmp_path / "missing.pt")


@needs_torch(importlib.util.find_spec("torch.utils.serialization") is not None,
             "torch.utils.serialization.config (save.compute_crc32)", "2.7")
def test_a_file_saved_without_checksums_loads(tmp_path):
    """torch's compute_crc32 = False (faster saves of large checkpoints) writes CRC 0 for every record; the first
    checksum check called such a file damaged though torch.load reads it."""
    import torch.utils.serialization as serialization

    path = tmp_path / "model.pt"
    model = lr_model()
    with _crc_off(serialization.config.save):
        cartlorem.save_model(model, path)
    import zipfile

    with zipfile.ZipFile(path) as archive:
        assert all(i.CRC == 0 for i in archive.infolist() if i.file_size)
    loaded = cartlorem.load_model(path)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())


class _crc_off:
    def __init__(self, config):
        self.config = config

    def __enter__(self):
        self.old, self.config.compute_crc32 = self.config.compute_crc32, False

    def __exit__(self, *exc):
        self.config.compute_crc32 = self.old


def test_a_loaded_model_is_in_eval_mode(tmp_path):
    """load_model returned the model in training mode: a direct model(graph) kept a second-order graph of its
    forces (create_graph defaults to the mode), forces with requires_grad and a slower call."""
    model = lr_model()
    cartlorem.save_model(model.train(), tmp_path / "m.pt")
    loaded = cartlorem.load_model(tmp_path / "m.pt")
    assert loaded.training is False
    out = loaded(atoms_to_graph(methanol(), loaded.cutoff))
    assert not out["forces"].requires_grad


def test_a_state_dict_carries_the_statistics_into_a_new_model(tmp_path):
    """avg_num_neighbors is a float in the layers, not a parameter or buffer: torch.save(model.state_dict()) loaded
    into a model built with the same options matched every key and ran with the default 10 (energies off by 0.18 eV
    in a reviewer's trained model), and save_model then wrote 10 into the file. A state dict written before it held
    the statistic loads, with a warning; every model file keeps its predictions."""
    import warnings

    trained, atoms = lr_model(), methanol()
    expected = energy_forces(trained, atoms)
    torch.save(trained.state_dict(), tmp_path / "weights.pt")

    def fresh():
        torch.manual_seed(5)
        return cartlorem.CartLorem([1, 6, 8], cutoff=4.0, long_range="multipole", channels=8, num_layers=1,
                                   correlation=2, num_basis=4, radial_hidden=8, readout_hidden=8).double().eval()

    model = fresh()
    assert model.config["avg_num_neighbors"] != 7.5
    model.load_state_dict(torch.load(tmp_path / "weights.pt", weights_only=True))
    assert model.config["avg_num_neighbors"] == 7.5 and all(layer.avg_num_neighbors == 7.5 for layer in model.layers)
    assert (model.config["scale"], model.config["shift"]) == (2.5, 0.1)  # the config follows the buffers
    energy, forces = energy_forces(model, atoms)
    assert energy == pytest.approx(expected[0], rel=1e-13) and np.allclose(forces, expected[1], rtol=1e-12, atol=0)
    cartlorem.save_model(model, tmp_path / "model.pt")
    assert cartlorem.load_model(tmp_path / "model.pt").config["avg_num_neighbors"] == 7.5

    old = {k: v for k, v in trained.state_dict().items() if k != "_extra_state"}  # an older cartlorem's state dict
    model = fresh()
    with pytest.warns(UserWarning, match="no _extra_state .avg_num_neighbors") as record:
        model.load_state_dict(old)
    assert [w.filename for w in record] == [__file__]  # the warning names the caller's line, not torch's
    # a file written before the key existed: load_model takes the value from its config
    torch.save({"format": "cartlorem-model-v4", "config": trained.config, "state_dict": old, "dtype": "float64"},
               tmp_path / "old.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = cartlorem.load_model(tmp_path / "old.pt")
    assert energy_forces(loaded, atoms)[0] == pytest.approx(expected[0], rel=1e-13)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_are_refused_not_run(dtype, tmp_path):
    """A .half() model ran (0.65 eV off at -4000 eV), and save_model wrote files that load_model refuses."""
    model = lr_model().to(dtype)
    with pytest.raises(ValueError, match="runs in float32 or float64"):
        model(atoms_to_graph(methanol(), model.cutoff))
    with pytest.raises(ValueError, match="writes float32 or float64 models"):
        cartlorem.save_model(model, tmp_path / "half.pt")
    assert not (tmp_path / "half.pt").exists()


def test_what_is_not_a_graph_is_named():
    """An Atoms object, or numpy arrays in a Graph's fields, ended in an AttributeError from deep inside."""
    model, atoms = lr_model(), methanol()
    with pytest.raises(TypeError, match="takes a cartlorem Graph .* got Atoms"):
        model(atoms)
    graph = atoms_to_graph(atoms, model.cutoff)
    with pytest.raises(ValueError, match="graph.positions must be a tensor, got ndarray"):
        model(graph.replace(positions=graph.positions.numpy()))
    # positions without a .device (numpy < 2 arrays, which torch 2.3 needs, or a list): an AttributeError first
    with pytest.raises(ValueError, match="graph.positions must be a tensor, got list"):
        model(graph.replace(positions=graph.positions.tolist()))


def test_a_pickled_object_is_named_in_torch_23s_wording_too(tmp_path, monkeypatch):
    """torch 2.3's safe loader names a refused class "Unsupported class X", later releases "GLOBAL X": under 2.3 a
    file holding a pickled object was called damaged, or one saved with another pickle protocol."""
    import pickle

    cartlorem.save_model(lr_model(), tmp_path / "m.pt")

    def refuse(*args, **kwargs):
        raise pickle.UnpicklingError("Weights only load failed. Re-running `torch.load` with `weights_only` set to "
                                     "`False` will likely succeed, but it can result in arbitrary code execution. "
                                     "Unsupported class mypackage.Hook")

    monkeypatch.setattr(torch, "load", refuse)
    with pytest.raises(ValueError, match=r"pickled Python object .*mypackage\.Hook.*trust_pickle=True"):
        cartlorem.load_model(tmp_path / "m.pt")


def test_a_file_of_a_newer_format_says_so(tmp_path):
    """Files hold "_extra_state" since v5; under the v4 number an older cartlorem called such a file's weights
    unfit for the model instead of saying it was newer. A v6 file is named newer here."""
    model = lr_model()
    cartlorem.save_model(model, tmp_path / "m.pt")
    obj = torch.load(tmp_path / "m.pt", weights_only=True)
    assert obj["format"] == "cartlorem-model-v5" and "_extra_state" in obj["state_dict"]
    torch.save({**obj, "format": "cartlorem-model-v6"}, tmp_path / "newer.pt")
    with pytest.raises(ValueError, match="written by a newer cartlorem"):
        cartlorem.load_model(tmp_path / "newer.pt")


def test_a_file_the_safe_reader_cannot_parse_loads_with_the_opt_in(tmp_path):
    """torch.save(..., pickle_protocol=4) writes opcodes torch's weights-only reader lacks: such a file was called
    corrupt, and trust_pickle=True did not read it either (only a refused GLOBAL led to the opt-in)."""
    model, atoms = lr_model(), methanol()
    torch.save(cartlorem.model.model_payload(model), tmp_path / "p4.pt", pickle_protocol=4)
    with pytest.raises(ValueError, match="with the safe reader .* trust_pickle=True"):
        cartlorem.load_model(tmp_path / "p4.pt")
    loaded = cartlorem.load_model(tmp_path / "p4.pt", trust_pickle=True)
    assert energy_forces(loaded, atoms)[0] == energy_forces(model, atoms)[0]


def test_load_model_calls_a_folder_a_folder(tmp_path):
    """load_model (and with it the calculator, the i-PI client and the LAMMPS runner) said of a folder or a device
    that the model file was "not found"; the cartlorem command said "is a folder, not a file"."""
    import cartlorem

    with pytest.raises(IsADirectoryError, match=r"model file '.*' is a folder, not a file"):
        cartlorem.load_model(tmp_path)
    with pytest.raises(ValueError, match=r"model file '/dev/null' is not a regular file"):
        cartlorem.load_model("/dev/null")
    with pytest.raises(FileNotFoundError, match="model file not found"):
        cartlorem.load_model(tmp_path / "missing.pt")
