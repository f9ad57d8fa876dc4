"""NVE molecular dynamics with the CartLorem ASE calculator; prints the energy drift (< 1 minute).

    python examples/md_nve.py [--model RUN/model.pt] [--steps 200]

Without ``--model`` the model of a previous ``cartlorem demo`` run (./cartlorem_demo_run/model.pt)
is used if there is one; otherwise a small model is first trained for ~30 s on the bundled demo
data (a rough potential; ``cartlorem demo`` or ``cartlorem train`` make better ones).
Velocity Verlet at 0.5 fs from a Maxwell–Boltzmann distribution at 300 K (cartlorem.md.run_nve); a good potential and
integrator conserve the total energy, so its drift measures the smoothness of the model.
"""

import argparse
import os

import ase.io
import torch

import cartlorem
from cartlorem.datasets import demo_path
from cartlorem.md import run_nve

DEMO_MODEL = os.path.join("cartlorem_demo_run", "model.pt")


def quick_model(path):
    from cartlorem.data import read_dataset, split
    from cartlorem.train import train

    graphs = read_dataset(path, 5.0, dtype=torch.float32)
    tr, va = split(graphs, valid_fraction=0.1, seed=0)
    species = sorted({int(z) for g in graphs for z in g.species.tolist()})
    torch.manual_seed(0)
    model = cartlorem.CartLorem(
        species, cutoff=5.0, long_range=None, channels=16, num_layers=2, correlation=2, radial_hidden=32
    ).float()
    train(
        model,
        [graphs[k] for k in tr],
        [graphs[k] for k in va],
        epochs=20,
        batch_size=4,
        lr=1e-2,
        max_time=30.0,
        progress=False,
    )
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        help="model file (default: ./cartlorem_demo_run/model.pt if present, else "
        "train a small one for ~30 s)",
    )
    parser.add_argument(
        "--data", default=None, help="extxyz file with the start structure (default: demo data)"
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--timestep", type=float, default=0.5, help="fs")
    parser.add_argument("--temperature", type=float, default=300.0, help="K")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a small model on a small cluster: one thread is the fastest on a CPU

    data = args.data or demo_path()
    if args.model is None and os.path.isfile(DEMO_MODEL):
        args.model = DEMO_MODEL
    if args.model:
        print(f"model: {args.model}")
        model = cartlorem.load_model(args.model)
    else:
        print("training a small model for ~30 s ...")
        model = quick_model(data)
    atoms = ase.io.read(data, index=0)
    atoms.calc = cartlorem.CartLoremCalculator(model, dtype="float64", skin=0.5)

    md = run_nve(atoms, steps=args.steps, timestep_fs=args.timestep, temperature_K=args.temperature, seed=0)
    if md["error"]:
        print(md["error"])
    print(
        f"{atoms.get_chemical_formula()}: {md['steps_done']} steps of {args.timestep} fs from "
        f"{md['temperature'][0]:.0f} K, final T {md['temperature'][-1]:.0f} K"
    )
    print(
        f"energy drift {md['drift_mev_per_atom_per_ps']:+.3f} meV/atom/ps; "
        f"max |ΔE| {md['max_abs_de_mev_per_atom']:.3f} meV/atom"
    )


if __name__ == "__main__":
    main()
