"""i-PI: serve a CartLorem model to an i-PI server (path integrals, advanced thermostats, ...).

i-PI propagates the nuclei and asks a client for energy, forces and virial over its socket
protocol; this module is that client: ASE's ``SocketClient`` around :class:`CartLoremCalculator`.
i-PI sends only positions and the cell, so the client reads the species (in the same order) and the
boundary conditions from a structure file, normally the one i-PI starts from, written by ASE (extxyz, read
by i-PI with ``<file mode="ase">``); a file in i-PI's own xyz format is refused, as ASE reads no cell and no
pbc from it. Two commands, in two shells::

    i-pi input.xml          # <ffsocket name="cartlorem" mode="unix"><address>cartlorem</address></ffsocket>
    python -m cartlorem.integrations.ipi --model model.pt --structure init.xyz --unix cartlorem

(``--port 31415 [--host HOST]`` for an inet socket, e.g. a client on another machine). Several
clients may connect to one server (one per bead, in parallel). ASE places unix sockets at
``/tmp/ipi_<name>``, which is also i-PI's default. Needs ``pip install ipi`` for the server only.

Driven dynamics in an electric field (i-PI's electric dipole approximation, ``<driven_dynamics mode="eda-nve">`` or
``"eda-nvt"`` with ``<efield>`` and ``<bec mode="driver"/>``): with ``--born-charges`` (long-range models) every
reply carries the model's Born effective charges in its extra string, ``{"BEC": [3N, 3]}`` (row 3i + b, column a:
∂P_a/∂r_ib, e), and for a molecule its dipole, ``"dipole"`` (e·bohr); i-PI adds the forces Z*ᵀE(t) for its
(time-dependent) field. Three more backward passes per step for a molecule, 21 for a periodic cell or a slab
(whose Z* does not depend on the images the positions are taken in: :func:`cartlorem.forces.born_charges`).
"""

from __future__ import annotations

import math
import re
import sys
import time
from typing import Optional

import numpy as np

__all__ = ["serve", "main"]


def serve(model_or_path, atoms, *, unix: Optional[str] = None, host: Optional[str] = None, port: Optional[int] = None,
          device: str = "cpu", dtype=None, connect_timeout: float = 60.0, timeout: Optional[float] = None,
          use_stress: Optional[bool] = None, born_charges: bool = False, log=None) -> None:
    """Connect to a running i-PI server and answer its force requests until it sends EXIT.

    Args:
        model_or_path: a CartLorem model or a file written by ``save_model``.
        atoms: ``ase.Atoms`` with the species in i-PI's atom order and the boundary conditions (pbc) of
            the simulation (positions and cell are overwritten by what i-PI sends).
        unix: name of a unix socket (ASE connects to ``/tmp/ipi_<unix>``); else ``host``/``port``
            (inet, host default "localhost", port default 31415).
        device, dtype: passed to :class:`CartLoremCalculator`.
        connect_timeout: seconds to keep retrying while the server is not listening yet.
        timeout: seconds to wait for a message from the server before giving up (None: forever).
        use_stress: send the virial −∂E/∂ε (default True, for every boundary: for a slab or a cluster in i-PI's
            box, whose volume is mostly vacuum, it is the strain derivative i-PI divides by the box volume, as
            the LAMMPS adapter gives it; False sends zeros).
        born_charges: send the Born effective charges (and a molecule's dipole) in each reply's extra string, for
            i-PI's driven dynamics in an electric field (module docstring; long-range models only).
        log: file object for ASE's protocol log.
    """
    import json

    from ase.calculators.calculator import all_changes
    from ase.calculators.socketio import SocketClient, SocketClosed
    from ase.units import Bohr

    from ..calculator import CartLoremCalculator

    if unix is not None and (port is not None or host is not None):
        raise ValueError(f"give either a unix socket name or an inet {'port' if port is not None else 'host'}, "
                         "not both")
    host = "localhost" if host is None else host
    # 0 made ASE's socket non-blocking (BlockingIOError at the first read); NaN, inf or < 0: no wait that means
    if timeout is not None and not 0 < timeout < math.inf:
        raise ValueError(f"timeout must be a positive number of seconds (None: wait forever), got {timeout!r}")
    if not 0 <= connect_timeout < math.inf:
        raise ValueError(f"connect_timeout must be a finite number of seconds >= 0, got {connect_timeout!r}")

    class Client(SocketClient):
        extra = np.zeros(1, dtype=np.byte)  # the extra string of the next reply (ASE's default: one zero byte)

        def calculate(self, atoms, use_stress):  # ASE's takes −V σ, which a slab or a cluster does not have
            if born_charges:  # one evaluation with every output (the virial below is then read, not computed)
                molecule = not atoms.pbc.any()
                names = ["energy", "forces", "born_charges"] + ["virial"] * use_stress + ["dipole"] * molecule
                atoms.calc.calculate(atoms, names, all_changes)
                z = atoms.calc.extra_results["born_charges"]  # [N, 3, 3]: [i, a, b] = dP_a / dr_ib
                extra = {"BEC": z.transpose(0, 2, 1).reshape(-1, 3).tolist()}  # i-PI's [3N, 3]: row 3i + b, column a
                if molecule:
                    extra["dipole"] = (atoms.calc.results["dipole"] / Bohr).tolist()
                self.extra = np.frombuffer(json.dumps(extra).encode(), dtype=np.byte)
            virial = atoms.calc.get_extra("virial", atoms) if use_stress else None  # one evaluation, with E and F
            energy, forces, zeros = super().calculate(atoms, False)  # those results, not computed again
            return energy, forces, zeros if virial is None else virial

    atoms = atoms.copy()
    atoms.calc = CartLoremCalculator(model_or_path, device=device, dtype=dtype)
    if born_charges and atoms.calc.model.long_range is None:
        raise ValueError("--born-charges needs learned charges: this model has no long range (long_range=None)")
    use_stress = True if use_stress is None else bool(use_stress)
    deadline = time.monotonic() + connect_timeout
    while True:
        try:
            client = Client(host=host, port=port, unixsocket=unix, timeout=timeout, log=log)
            break
        except (FileNotFoundError, ConnectionRefusedError) as exc:  # the server is not listening yet
            if time.monotonic() > deadline:
                where = f"unix socket /tmp/ipi_{unix}" if unix is not None else f"{host}:{port or 31415}"
                raise TimeoutError(f"no i-PI server at {where} after {connect_timeout:.0f} s") from exc
            time.sleep(0.1)
    protocol = getattr(client, "protocol", None)
    if protocol is not None and hasattr(protocol, "recvposdata"):  # ASE's IPIProtocol: check each frame's size
        receive = protocol.recvposdata

        def recvposdata():
            cell, icell, positions = receive()
            if len(positions) != len(atoms):
                raise ValueError(f"i-PI sent the positions of {len(positions)} atoms, but the structure given to the "
                                 f"client has {len(atoms)}: give it the structure i-PI simulates, atoms in i-PI's "
                                 "order")
            return cell, icell, positions

        protocol.recvposdata = recvposdata
    if born_charges:
        send = client.protocol.sendforce

        def sendforce(energy, forces, virial):  # ASE's client sends no extra string of its own
            send(energy, forces, virial, morebytes=client.extra)

        client.protocol.sendforce = sendforce
    try:
        client.run(atoms, use_stress=use_stress)
    except TimeoutError as exc:  # the socket's own message is only "timed out"
        if timeout is None:
            raise
        raise TimeoutError(f"no message from the i-PI server in {timeout:g} s (the client's timeout)") from exc
    except (BrokenPipeError, ConnectionResetError, SocketClosed) as exc:  # SocketClosed: in the middle of a message
        reason = exc.strerror or str(exc) or "closed in the middle of a message"
        raise ConnectionError(f"the i-PI server dropped the connection ({reason})") from exc
    finally:
        client.close()


_IPI_XYZ_CELL = re.compile(r"CELL[\(\[\{](abcABC|H|GENH)[\)\]\}]:")  # i-PI's xyz comment line (i-PI's io_xyz)


def _read_structure(path):
    """The structure file of :func:`main`, read with ASE; ValueError for a file in i-PI's own xyz format.

    ASE reads i-PI's xyz comment line (``# CELL(abcABC): ...``) as a plain comment: the atoms come back with no
    cell and pbc all False, and the client would compute an open cluster while i-PI runs a periodic box.
    """
    import ase.io

    with open(path, errors="replace") as fh:
        head = [fh.readline(), fh.readline()]
    if head[0].strip().isdigit() and _IPI_XYZ_CELL.search(head[1]):
        raise ValueError(
            f"{path} is in i-PI's xyz format, whose cell and boundary conditions ASE does not read (the client "
            "would compute an open cluster in a periodic i-PI box): give --structure a file that states them, "
            "e.g. extxyz written by ase.io.write with pbc=True (i-PI reads it with <file mode='ase'>)")
    return ase.io.read(path)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m cartlorem.integrations.ipi",
                                description="Serve a CartLorem model to an i-PI server.")
    from ..cli import USER_ERRORS
    from ..config import parse_path

    p.add_argument("--model", required=True, type=parse_path,
                   help="model file written by cartlorem (save_model / train)")
    p.add_argument("--structure", required=True, type=parse_path,
                   help="structure file readable by ASE with the atoms in i-PI's order and its boundary conditions "
                   "(e.g. the extxyz file i-PI starts from with <file mode='ase'>)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--unix", help="unix socket name (the <address> of i-PI's <ffsocket mode='unix'>)")
    where.add_argument("--port", type=int, help="inet port of i-PI's <ffsocket mode='inet'>")
    p.add_argument("--host", default=None, help="host of i-PI's inet socket (default localhost; not with --unix)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "float64"])
    p.add_argument("--connect-timeout", type=float, default=60.0, help="seconds to wait for the server to listen")
    p.add_argument("--timeout", type=float, default=None, help="seconds to wait for each server message")
    p.add_argument("--born-charges", action="store_true",
                   help="send the Born effective charges (and a molecule's dipole) with every reply, for i-PI's "
                   "driven dynamics in an electric field (eda-nve / eda-nvt with <bec mode='driver'/>)")
    args = p.parse_args(argv)
    try:
        atoms = _read_structure(args.structure)
        serve(args.model, atoms, unix=args.unix, host=args.host, port=args.port, device=args.device,
              dtype=args.dtype, connect_timeout=args.connect_timeout, timeout=args.timeout,
              born_charges=args.born_charges)
    except USER_ERRORS as err:  # a refused input: one line, as the cartlorem command gives
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (TimeoutError, ConnectionError) as err:  # no server, a silent one, or one that went away
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
