"""The i-PI client's command line reads the species and boundary conditions from a structure file; these
checks need no i-PI server (nothing listens on the socket, so a client that gets that far times out)."""

import os
import secrets

import ase.io
import numpy as np
import pytest
import torch
from ase.build import bulk

from cartlorem import CartLorem, save_model
from cartlorem.integrations import ipi


@pytest.fixture
def model_file(tmp_path):
    torch.manual_seed(0)
    model = CartLorem([11, 17], cutoff=3.0, long_range=None, channels=4, num_layers=1, correlation=2, num_basis=4,
                      radial_hidden=8, readout_hidden=8)
    save_model(model, tmp_path / "model.pt")
    return tmp_path / "model.pt"


def _client(model_file, structure):
    socket = f"cartlorem-test-{os.getpid()}-{secrets.token_hex(4)}"  # nothing listens there
    return ipi.main(["--model", str(model_file), "--structure", str(structure), "--unix", socket,
                     "--connect-timeout", "0"])


def test_structure_in_ipi_xyz_format_is_refused(tmp_path, model_file, capsys):
    """i-PI's own xyz format (the usual <file mode='xyz'> init file, which the --structure help suggested) keeps
    the cell in the comment line, which ASE reads as a plain comment: pbc all False, no cell. The client then
    served open-cluster energies and forces (and no virial) to i-PI's periodic simulation."""
    salt = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    lines = [str(len(salt)), "# CELL(abcABC):    5.64000     5.64000     5.64000    90.00000    90.00000    90.00000"
             "  Step:           0  Bead:       0 positions{angstrom}  cell{angstrom}"]
    lines += [f"{s:2s} {x:12.6f} {y:12.6f} {z:12.6f}" for s, (x, y, z) in zip(salt.get_chemical_symbols(),
                                                                                salt.positions)]
    path = tmp_path / "init.xyz"
    path.write_text("\n".join(lines) + "\n")
    read = ase.io.read(path)  # what the client got from it
    assert read.get_chemical_symbols() == salt.get_chemical_symbols() and not read.pbc.any()
    np.testing.assert_allclose(read.positions, salt.positions, atol=1e-6)
    assert _client(model_file, path) == 2  # one line, no traceback
    err = capsys.readouterr().err
    assert "init.xyz is in i-PI's xyz format, whose cell and boundary conditions ASE does not read" in err
    assert "Traceback" not in err
    assert _client(model_file, tmp_path) == 2  # a folder as the structure: IsADirectoryError, in one line too
    assert "error: [Errno 21] Is a directory" in capsys.readouterr().err


def test_structure_written_by_ase_reaches_the_connection(tmp_path, model_file, capsys):
    salt = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    ase.io.write(tmp_path / "init.xyz", salt)  # extxyz: cell and pbc in the comment line
    assert ase.io.read(tmp_path / "init.xyz").pbc.all()
    assert _client(model_file, tmp_path / "init.xyz") == 1
    assert "error: no i-PI server" in capsys.readouterr().err


def test_the_client_and_the_lammps_runner_expand_the_home_folder(tmp_path, model_file, monkeypatch, capsys):
    """The shell leaves '~' in --model=~/model.pt: the i-PI client ended in a FileNotFoundError traceback for
    '~/init.xyz', and the LAMMPS runner's arguments were not expanded either."""
    import shutil

    from cartlorem.integrations import lammps

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    shutil.copy(model_file, home / "model.pt")
    ase.io.write(home / "init.xyz", bulk("NaCl", "rocksalt", a=5.64, cubic=True))
    assert ipi.main(["--model=~/model.pt", "--structure=~/init.xyz", "--unix", f"cartlorem-test-{secrets.token_hex(4)}",
                     "--connect-timeout", "0"]) == 1
    assert "error: no i-PI server" in capsys.readouterr().err  # read both files: it got as far as the socket
    seen = {}

    def run_input(lmp, path, model, elements, **kw):
        seen.update(path=path, model=model)

    monkeypatch.setattr(lammps, "load_lammps", lambda: (lambda cmdargs: type("L", (), {"close": lambda s: None})()))
    monkeypatch.setattr(lammps, "run_input", run_input)
    assert lammps.main(["~/in.lmp", "--model=~/model.pt", "--elements", "Na", "Cl", "--log", "none"]) == 0
    assert seen == {"path": str(home / "in.lmp"), "model": str(home / "model.pt")}

    def refuse(lmp, path, model, elements, **kw):
        raise ValueError("fix external mode pf/array is not supported")

    monkeypatch.setattr(lammps, "run_input", refuse)  # a refused input: one line, no traceback (it printed ~10)
    assert lammps.main(["in.lmp", "--model", "m.pt", "--elements", "Na", "--log", "none"]) == 2
    assert "error: fix external mode pf/array" in capsys.readouterr().err


def _serve_to_ase_server(model, client_atoms, server_atoms, stress=False):
    """Run :func:`ipi.serve` in a thread against ASE's i-PI server (SocketIOCalculator), which asks for the energy
    and forces of ``server_atoms``; returns (energy, forces) or the exception of each side."""
    import threading

    from ase.calculators.socketio import SocketIOCalculator

    name = f"cartlorem-test-{os.getpid()}-{secrets.token_hex(4)}"
    client_errors = []

    def client():
        try:
            ipi.serve(model, client_atoms, unix=name, connect_timeout=30, timeout=30)
        except Exception as err:  # noqa: BLE001 -- reported to the test
            client_errors.append(err)

    try:
        with SocketIOCalculator(unixsocket=name, timeout=30) as calc:
            thread = threading.Thread(target=client, daemon=True)
            thread.start()
            atoms = server_atoms.copy()
            atoms.calc = calc
            try:
                result = (atoms.get_potential_energy(), atoms.get_forces(),
                          atoms.get_stress(voigt=False) if stress else None)
            except Exception as err:  # noqa: BLE001 -- the client hung up
                result = err
        thread.join(30)
    finally:
        if os.path.exists(f"/tmp/ipi_{name}"):
            os.unlink(f"/tmp/ipi_{name}")
    return result, client_errors


def _tiny_salt_model():
    torch.manual_seed(0)
    model = CartLorem([11, 17], cutoff=3.0, long_range=None, channels=4, num_layers=1, correlation=2, num_basis=4,
                      radial_hidden=8, readout_hidden=8).double()
    model.set_statistics(atomic_energies={11: -1.0, 17: -2.0}, avg_num_neighbors=6.0, scale=3.0)
    return model.eval()


def test_client_answers_an_ipi_server_with_the_calculators_numbers():
    from cartlorem import CartLoremCalculator

    model = _tiny_salt_model()
    salt = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    moved = salt.copy()
    moved.rattle(0.1, seed=0)  # the server's positions replace the client's
    result, client_errors = _serve_to_ase_server(model, salt, moved)
    assert not client_errors and not isinstance(result, Exception), (result, client_errors)
    reference = moved.copy()
    reference.calc = CartLoremCalculator(model)
    assert result[0] == pytest.approx(reference.get_potential_energy(), rel=1e-9)
    assert np.abs(reference.get_forces()).max() > 1e-3
    np.testing.assert_allclose(result[1], reference.get_forces(), rtol=0, atol=1e-8)


def test_client_names_an_atom_count_that_differs_from_the_servers():
    """A structure file with other atoms than i-PI's system failed inside ASE's socket loop with "could not
    broadcast input array from shape (16,3) into shape (8,3)"."""
    salt = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    result, client_errors = _serve_to_ase_server(_tiny_salt_model(), salt, salt.repeat((2, 1, 1)))
    assert isinstance(result, Exception)  # the client hung up
    assert len(client_errors) == 1
    assert str(client_errors[0]).startswith("i-PI sent the positions of 16 atoms, but the structure given to the "
                                            "client has 8")


def test_client_sends_the_virial_of_a_slab():
    """A slab got no virial (zeros): the client sent −V σ, and the calculator has no stress for a slab. i-PI's box
    pressure then lacked the model's part. It is −∂E/∂ε, as the LAMMPS adapter gives it (finite differences)."""
    from cartlorem import CartLoremCalculator

    model = _tiny_salt_model()
    slab = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    slab.rattle(0.1, seed=1)
    slab.center(vacuum=5.0, axis=2)
    slab.pbc = [True, True, False]
    calls = []
    forward = model.forward

    def counted(*args, **kwargs):
        calls.append(kwargs.get("compute_stress"))
        return forward(*args, **kwargs)

    model.forward = counted
    try:
        result, client_errors = _serve_to_ase_server(model, slab, slab, stress=True)
    finally:
        del model.forward
    assert not client_errors and not isinstance(result, Exception), (result, client_errors)
    assert len(calls) == 1, calls  # one evaluation per step gives energy, forces and virial (a first fix took two)
    virial = -slab.get_volume() * result[2]  # what the server received, as ASE's server turns it into a stress

    def energy(eps):
        b = slab.copy()
        b.set_cell(slab.cell.array @ (np.eye(3) + eps), scale_atoms=True)
        b.calc = CartLoremCalculator(model, skin=0.0)
        return b.get_potential_energy()

    h, want = 1e-5, np.zeros((3, 3))
    for a in range(3):
        for b in range(3):
            e = np.zeros((3, 3))
            e[a, b] = h
            want[a, b] = -(energy(e) - energy(-e)) / (2 * h)
    assert np.abs(want).max() > 1e-2
    np.testing.assert_allclose(virial, want, rtol=0, atol=1e-6)


def _fake_server(name, script):
    """A unix socket where i-PI's would be (ASE's client connects to /tmp/ipi_<name>); ``script(connection)`` runs
    on the one connection it accepts, in a thread."""
    import socket
    import threading

    path = f"/tmp/ipi_{name}"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)

    def serve():
        connection, _ = server.accept()
        try:
            script(connection)
        finally:
            connection.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return server, path, thread


@pytest.mark.parametrize("server", ["silent", "hangs up", "dies mid-message"])
def test_a_silent_or_vanishing_server_is_one_line(tmp_path, model_file, capsys, server):
    """No server, a server that sends nothing within --timeout, and one that drops the connection mid-exchange
    ended in tracebacks (TimeoutError, 'timed out'; BrokenPipeError) instead of the command's one error line."""
    import time

    salt = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    ase.io.write(tmp_path / "init.xyz", salt)
    assert _client(model_file, tmp_path / "init.xyz") == 1  # nobody listens
    assert "error: no i-PI server at unix socket /tmp/ipi_cartlorem-test-" in capsys.readouterr().err
    name = f"cartlorem-test-{os.getpid()}-{secrets.token_hex(4)}"
    if server == "silent":
        script = lambda connection: time.sleep(2.0)  # noqa: E731
        expected = "error: no message from the i-PI server in 0.3 s (the client's timeout)"
    elif server == "hangs up":
        script = lambda connection: connection.sendall(b"STATUS".ljust(12))  # noqa: E731  then it closes
        expected = "error: the i-PI server dropped the connection"
    else:  # STATUS, the client's READY, then a POSDATA header and a part of the cell (ASE's SocketClosed)
        def script(connection):
            connection.sendall(b"STATUS".ljust(12))
            connection.recv(12)
            connection.sendall(b"POSDATA".ljust(12) + b"\0" * 20)

        expected = "error: the i-PI server dropped the connection (closed in the middle of a message)"
    listener, path, thread = _fake_server(name, script)
    try:
        rc = ipi.main(["--model", str(model_file), "--structure", str(tmp_path / "init.xyz"), "--unix", name,
                       "--connect-timeout", "5", "--timeout", "0.3"])
    finally:
        thread.join(5)
        listener.close()
        os.unlink(path)
    err = capsys.readouterr().err
    assert rc == 1 and expected in err and "Traceback" not in err, err


@pytest.mark.parametrize("flags, expected", [
    (["--timeout", "0"], "timeout must be a positive number of seconds"),
    (["--timeout", "-1"], "timeout must be a positive number of seconds"),
    (["--connect-timeout", "-1"], "connect_timeout must be a finite number of seconds >= 0"),
    (["--host", "remote.invalid"], "give either a unix socket name or an inet host, not both"),
])
def test_timeouts_and_a_host_the_client_cannot_use_are_refused(tmp_path, model_file, capsys, flags, expected):
    """--timeout 0 made ASE's socket non-blocking: a BlockingIOError traceback at the first read from a server
    that had not sent yet; --host was ignored with --unix (the client connected to the local socket)."""
    ase.io.write(tmp_path / "init.xyz", bulk("NaCl", "rocksalt", a=5.64, cubic=True))
    rc = ipi.main(["--model", str(model_file), "--structure", str(tmp_path / "init.xyz"), "--unix",
                   f"cartlorem-test-{secrets.token_hex(4)}", "--connect-timeout", "0", *flags])
    err = capsys.readouterr().err
    assert rc == 2 and f"error: {expected}" in err and "Traceback" not in err, err


def test_born_charges_of_a_local_model_are_refused_before_connecting(tmp_path, model_file, capsys):
    """--born-charges (i-PI's driven dynamics in a field) needs learned charges: a local model is refused in one
    line before the client waits for a server, not at i-PI's first force request."""
    salt = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    ase.io.write(tmp_path / "init.xyz", salt)
    socket = f"cartlorem-test-{os.getpid()}-{secrets.token_hex(4)}"
    code = ipi.main(["--model", str(model_file), "--structure", str(tmp_path / "init.xyz"), "--unix", socket,
                     "--connect-timeout", "0", "--born-charges"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--born-charges needs learned charges: this model has no long range" in err and "Traceback" not in err
