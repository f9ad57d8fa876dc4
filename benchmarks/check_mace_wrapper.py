"""Check harness's MACE wrapper (``harness.MaceModel`` on ``harness.mace_inputs``) against finite differences.

The benchmarks feed MACE cartlorem's graph through ``harness.mace_inputs`` and read its forces and stress
through ``harness.MaceModel``. This checks both against central finite differences of the wrapper's own
energy, in float64, for a MACE at the matched settings of ``harness.build_mace`` (random weights, C = 8):

* forces: F_ia = −(E(r + h e_ia) − E(r − h e_ia)) / 2h for every atom and component, the graph rebuilt for
  every displaced structure (``cartlorem.graph.atoms_to_graph``, 5 Å);
* stress (periodic structure only): σ_ab = (1/V) ∂E/∂ε_ab by central differences of a symmetric strain
  (cell and positions scaled by 1 + ε), the convention of cartlorem and ASE.

Structures: a sheared, rattled periodic box of 8 water molecules (24 atoms) and a rattled ethanol molecule
(open boundaries, no stress). Needs the peers venv (``bash benchmarks/setup_peers.sh``)::

    PYTHONPATH=$PWD benchmarks/.venv-peers/bin/python benchmarks/check_mace_wrapper.py

Writes benchmarks/results/check_mace_wrapper.{json,md} (commit and command stamped); exits 1 if a
deviation exceeds the tolerance.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project: cartlorem and benchmarks
from benchmarks import harness  # noqa: E402

HERE = Path(__file__).resolve().parent
CUTOFF = 5.0


def structures():
    """(name, ase.Atoms): a sheared periodic water box and an open ethanol molecule, rattled (seeded)."""
    from ase.build import molecule

    box = harness.water_box(2)
    cell = np.array(box.get_cell())
    shear = np.eye(3) + np.array([[0.0, 0.04, -0.03], [0.02, 0.0, 0.05], [0.0, -0.02, 0.0]])
    box.set_cell(cell @ shear, scale_atoms=True)  # a triclinic cell: every stress component is exercised
    box.rattle(0.05, seed=1)
    mol = molecule("CH3CH2OH")
    mol.rattle(0.05, seed=2)
    return [("water box (periodic, sheared), 24 atoms", box), ("ethanol (open), 9 atoms", mol)]


def model_for(species, channels):
    torch.manual_seed(0)
    mace = harness.build_mace(species, channels=channels, cutoff=CUTOFF, avg_num_neighbors=10.0,
                              atomic_energies={z: -1.0 * z for z in species}, scale=0.5, shift=0.1)
    return harness.MaceModel(mace, species).to(torch.float64).eval()


def evaluate(model, atoms, stress):
    from cartlorem.graph import atoms_to_graph

    graph = atoms_to_graph(atoms, CUTOFF, dtype=torch.float64)
    out = model(graph, compute_forces=True, compute_stress=stress, create_graph=False)
    return {k: v.detach().numpy().astype(np.float64) for k, v in out.items()}


def energy(model, atoms):
    return float(evaluate(model, atoms, False)["energy"][0])


def check(model, name, atoms, h_pos, h_strain):
    periodic = bool(atoms.pbc.all())
    ref = evaluate(model, atoms, periodic)
    fd = np.zeros((len(atoms), 3))
    for i in range(len(atoms)):
        for a in range(3):
            e = []
            for sign in (1, -1):
                x = atoms.copy()
                p = x.get_positions()
                p[i, a] += sign * h_pos
                x.set_positions(p)
                e.append(energy(model, x))
            fd[i, a] = -(e[0] - e[1]) / (2 * h_pos)
    row = {"structure": name, "n_atoms": len(atoms), "energy_ev": float(ref["energy"][0]),
           "forces_max_abs_ev_a": float(np.abs(ref["forces"]).max()),
           "forces_max_dev_ev_a": float(np.abs(ref["forces"] - fd).max()), "h_positions_a": h_pos}
    if periodic:
        volume = atoms.get_volume()
        fd_s = np.zeros((3, 3))
        for a in range(3):
            for b in range(3):
                e = []
                for sign in (1, -1):
                    eps = np.zeros((3, 3))
                    eps[a, b] += sign * h_strain / 2
                    eps[b, a] += sign * h_strain / 2  # symmetric: the stress tensor is symmetric
                    x = atoms.copy()
                    x.set_cell(np.array(atoms.get_cell()) @ (np.eye(3) + eps), scale_atoms=True)
                    e.append(energy(model, x))
                fd_s[a, b] = (e[0] - e[1]) / (2 * h_strain) / volume
        s = ref["stress"][0]
        row.update(stress_max_abs_ev_a3=float(np.abs(s).max()),
                   stress_max_dev_ev_a3=float(np.abs(s - fd_s).max()),
                   stress_asymmetry_ev_a3=float(np.abs(s - s.T).max()), h_strain=h_strain)
    return row


def markdown(rows, meta, tol_f, tol_s) -> str:
    lines = [f"# MACE wrapper against finite differences ({meta['date']}, commit {(meta['git_commit'] or '?')[:10]}"
             f"{', dirty tree' if meta.get('git_dirty') else ''})", "",
             f"Command: `{meta['command']}`", "",
             f"torch {meta['torch']}, mace-torch {meta.get('mace_torch')}, e3nn {meta.get('e3nn')}; float64; "
             f"`harness.build_mace` at C = {meta['channels']}, random weights (seed 0), cutoff {CUTOFF} Å; the "
             "wrapper `harness.MaceModel` on `harness.mace_inputs` of cartlorem's graph. Central differences of the "
             "wrapper's energy: forces over every atom and component, stress (periodic only) over a symmetric "
             "strain, σ = (1/V) ∂E/∂ε. Tolerance: forces "
             f"{tol_f:g} eV/Å, stress {tol_s:g} eV/Å³.", "",
             "| structure | energy (eV) | max abs force (eV/Å) | max force deviation (eV/Å) "
             "| max abs stress (eV/Å³) | max stress deviation (eV/Å³) | stress asymmetry (eV/Å³) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['structure']} | {r['energy_ev']:.6f} | {r['forces_max_abs_ev_a']:.3e} | "
                     f"{r['forces_max_dev_ev_a']:.1e} | "
                     + (f"{r['stress_max_abs_ev_a3']:.3e} | {r['stress_max_dev_ev_a3']:.1e} | "
                        f"{r['stress_asymmetry_ev_a3']:.1e} |" if "stress_max_dev_ev_a3" in r else "— | — | — |"))
    lines += ["", f"Verdict: **{'passed' if meta['passed'] else 'FAILED'}**.", ""]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--channels", type=int, default=8)
    p.add_argument("--h-positions", type=float, default=1e-4, help="displacement step (Å)")
    p.add_argument("--h-strain", type=float, default=1e-5, help="strain step")
    p.add_argument("--tol-forces", type=float, default=1e-6, help="eV/Å")
    p.add_argument("--tol-stress", type=float, default=1e-7, help="eV/Å³")
    p.add_argument("--out", default=str(HERE / "results" / "check_mace_wrapper"))
    args = p.parse_args(argv)
    torch.set_default_dtype(torch.float64)  # MACE builds some buffers in the default dtype
    items = structures()
    species = sorted({int(z) for _, a in items for z in a.numbers})
    model = model_for(species, args.channels)
    rows = [check(model, name, atoms, args.h_positions, args.h_strain) for name, atoms in items]
    passed = all(r["forces_max_dev_ev_a"] <= args.tol_forces
                 and r.get("stress_max_dev_ev_a3", 0.0) <= args.tol_stress for r in rows)
    prefix = "PYTHONPATH=$PWD benchmarks/.venv-peers/bin/python"
    meta = {**harness.machine_info(), "command": harness.command_line("check_mace_wrapper.py", argv, prefix=prefix),
            "channels": args.channels, "passed": passed, "tol_forces_ev_a": args.tol_forces,
            "tol_stress_ev_a3": args.tol_stress, "peer_python": sys.executable}
    try:
        from importlib.metadata import version

        meta["mace_torch"] = version("mace-torch")
    except Exception:  # noqa: BLE001 - only a label
        meta["mace_torch"] = None
    md = markdown(rows, meta, args.tol_forces, args.tol_stress)
    harness.write_results("check_mace_wrapper", rows, meta, markdown=md, out=args.out)
    print(md)
    return 0 if passed else 1


if __name__ == "__main__":
    os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    sys.exit(main())
