"""How much of the C8H4 end-to-end torsion the two kinds of long-range block can carry across the chain.

The cumulene set's energy depends on the torsion θ between the two terminal CH2 planes, whose terminal carbons are
~9 Å apart. Two 5 Å layers do connect the two ends' hydrogens (through the central carbons' neighbours), but only
through messages damped by the cutoff envelope, and the short-range models sit on a ~20 meV/atom floor for many
epochs. One way for a long-range block to see θ is the orientation of one end's learned multipoles read at the
other end. The orientation of a CH2 plane is
rank 2 (a line in the plane normal to the chain axis), so take a unit traceless quadrupole Θ_A on one terminal
carbon, oriented along that line, and read it at the other terminal carbon with a unit quadrupole Θ_B turned by θ:

* ``multipole`` block: the interaction ½ Θ_B : G_A with G_A the field gradient of Θ_A (Gaussian-smeared, width
  σ = 1 Å as in the block), which falls off as r⁻⁵;
* ``lorem`` block: Θ_B : Ψ_A with Ψ_A the potential of the nine Cartesian components of Θ_A, each a scalar charge
  (the LOREM construction), which falls off as r⁻¹.

Both are computed with ``cartlorem.ewald.multipole_fields`` on the frames' own geometry. The script also fits the
reference energy E(θ) = a + b cos 2θ over the set and reports the size of the quadrupoles each kind would need for
its electrostatic term alone to carry the 0 → 90° energy difference 2|b| (COULOMB × |Θ|² × amplitude).

With ``--models LABEL=model.pt ...`` it also asks trained `multipole` models where their torsion energy comes from:
over the frames, the slope on cos 2θ of the predicted energy, split into the block's electrostatic energy, its learned
readout and the rest (the local model), and the electrostatic slope split by the distance of the atom pairs that carry
it (the pair energies of the learned multipoles of all channels as the Ewald layer receives them, with their
couplings; they add up to the block's electrostatic energy, checked per frame).

    PYTHONPATH=$PWD python3 benchmarks/torsion_signal.py --out benchmarks/results/torsion_signal
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.harness import add_data_argument, command_line, data_file, machine_info, write_json_md  # noqa: E402
from cartlorem.ewald import multipole_fields  # noqa: E402
from cartlorem.units import COULOMB  # noqa: E402

ANGLES = (0.0, 45.0, 90.0)
PAIR_BINS = ((0.0, 2.0), (2.0, 4.0), (4.0, 6.0), (6.0, 8.0), (8.0, math.inf))


def _line_quadrupole(u: torch.Tensor) -> torch.Tensor:
    q = torch.outer(u, u) - torch.eye(3, dtype=u.dtype) / 3
    return q / q.norm()


def signals(positions: np.ndarray, symbols, smearing: float) -> dict:
    """The two kinds' reading at one terminal carbon of a unit quadrupole on the other, by torsion angle."""
    pos = torch.tensor(positions, dtype=torch.float64)
    carbons = [i for i, s in enumerate(symbols) if s == "C"]
    d = torch.cdist(pos[carbons], pos[carbons])
    k = int(d.argmax())
    a, b = carbons[k // len(carbons)], carbons[k % len(carbons)]
    axis = pos[b] - pos[a]
    length = float(axis.norm())
    axis = axis / length
    helper = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    if abs(float(axis @ helper)) > 0.9:
        helper = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    e1 = torch.linalg.cross(axis, helper)
    e1 = e1 / e1.norm()
    e2 = torch.linalg.cross(axis, e1)
    two = pos[[a, b]]
    source = torch.zeros(2, 1, 3, 3, dtype=torch.float64)
    source[0, 0] = _line_quadrupole(e1)
    gradient = multipole_fields(two, quadrupoles=source, smearing=smearing).field_gradient[1, 0]
    psi = multipole_fields(two, charges=source.reshape(2, 9), smearing=smearing).potential[1].reshape(3, 3)
    rows = []
    for deg in ANGLES:
        t = math.radians(deg)
        theta_b = _line_quadrupole(math.cos(t) * e1 + math.sin(t) * e2)
        rows.append({"torsion_deg": deg, "multipole": float(0.5 * (theta_b * gradient).sum()),
                     "lorem": float((theta_b * psi).sum())})
    return {"distance": length, "rows": rows}


def _slope(cos2: np.ndarray, y) -> float:
    design = np.stack([np.ones_like(cos2), cos2], 1)
    return float(np.linalg.lstsq(design, np.asarray(y, dtype=float), rcond=None)[0][1])


def torsion_paths(path: str, frames) -> dict:
    """Where a trained long-range model's torsion energy comes from (see the module docstring)."""
    from cartlorem.calculator import CartLoremCalculator
    from cartlorem.ewald import electrostatic_energy
    from cartlorem.model import load_model
    from cartlorem.units import COULOMB

    model = load_model(path).double().eval()
    block = model.long_range_block
    if block is None or block.kind != "multipole":
        raise SystemExit(f"--models: {path} has no multipole long-range block")
    import cartlorem.nn.long_range as long_range

    seen = {}
    ewald_input = long_range.batched_multipole_fields

    def recording(*args, **kw):  # the multipoles as the Ewald layer receives them (charges corrected, Θ traceless)
        seen["sources"] = [kw["charges"], kw["dipoles"], kw["quadrupoles"]]
        return ewald_input(*args, **kw)

    long_range.batched_multipole_fields = recording
    hooks = [block.register_forward_hook(lambda m, i, o: seen.__setitem__("block", dict(o)))]
    calc = CartLoremCalculator(model)
    weights = block.coupling.detach().sqrt()  # a_c U(x) = U(sqrt(a_c) x): the pair energies carry the couplings
    rows = []
    try:
        for atoms in frames:
            atoms = atoms.copy()
            atoms.calc = calc
            total = atoms.get_potential_energy()
            q, mu, theta = (t.detach() for t in seen["sources"])
            src = [q * weights, mu * weights[:, None], theta * weights[:, None, None]]
            pos = torch.tensor(atoms.positions, dtype=torch.float64)
            dist = atoms.get_all_distances()
            pairs = np.zeros(len(PAIR_BINS))
            for i in range(len(atoms)):
                for j in range(i + 1, len(atoms)):
                    u = COULOMB * float(electrostatic_energy(pos[[i, j]], *(t[[i, j]] for t in src),
                                                             smearing=block.smearing))
                    pairs[next(k for k, (lo, hi) in enumerate(PAIR_BINS) if lo <= dist[i, j] < hi)] += u
            alone = [COULOMB * float(electrostatic_energy(pos, *(t if k == r else None for k, t in enumerate(src)),
                                                          smearing=block.smearing)) for r in range(3)]
            out = seen["block"]
            rows.append({"alone": alone, "total": total, "electrostatic": float(out["electrostatic"].detach().sum()),
                         "readout": float((model.scale * out["readout"]).detach().sum()), "pairs": pairs})
    finally:
        long_range.batched_multipole_fields = ewald_input
        for h in hooks:
            h.remove()
    cos2 = np.cos(2 * np.radians([f.info["theta"] for f in frames]))
    es = np.array([r["electrostatic"] for r in rows])
    pair_sum = np.array([r["pairs"].sum() for r in rows])
    total, readout = np.array([r["total"] for r in rows]), np.array([r["readout"] for r in rows])
    return {"placement": model.placement, "charge_channels": block.charge_channels,
            "slope": {"total": _slope(cos2, total), "electrostatic": _slope(cos2, es),
                      "readout": _slope(cos2, readout), "rest": _slope(cos2, total - es - readout)},
            "pair_slopes": [_slope(cos2, [r["pairs"][k] for r in rows]) for k in range(len(PAIR_BINS))],
            "rank_slopes": {name: _slope(cos2, [r["alone"][k] for r in rows]) for k, name in enumerate(("q", "mu", "theta"))},
            "pairs_minus_block_max_eV": float(np.abs(pair_sum - es).max())}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_data_argument(p)
    p.add_argument("--smearing", type=float, default=1.0, help="Gaussian width of the sources in Å (the block's default)")
    p.add_argument("--frames", type=int, default=20, help="frames (evenly spread over the set) to average the reading on")
    p.add_argument("--models", nargs="*", default=[], metavar="LABEL=PATH",
                   help="trained multipole models (model.pt) to split their torsion energy by path and pair distance")
    p.add_argument("--model-frames", type=int, default=40, help="frames (evenly spread) for --models")
    p.add_argument("--out", default=str(HERE / "results" / "torsion_signal"))
    args = p.parse_args(argv)
    from ase.io import read

    frames = read(str(data_file(args.data_dir, "cumulene")), ":")
    theta = np.radians([f.info["theta"] for f in frames])
    energy = np.array([f.get_potential_energy() for f in frames])
    design = np.stack([np.ones_like(theta), np.cos(2 * theta)], 1)
    (a0, b), *_ = np.linalg.lstsq(design, energy, rcond=None)
    resid = energy - design @ np.array([a0, b])
    span = 2 * abs(float(b))  # E(0) - E(90 deg) of the fit, eV

    picks = np.linspace(0, len(frames) - 1, min(args.frames, len(frames))).astype(int)
    per = [signals(frames[k].positions, frames[k].get_chemical_symbols(), args.smearing) for k in picks]
    mean = {kind: [float(np.mean([s["rows"][j][kind] for s in per])) for j in range(len(ANGLES))]
            for kind in ("multipole", "lorem")}
    amp = {kind: abs(v[0] - v[-1]) for kind, v in mean.items()}
    need = {kind: math.sqrt(span / (COULOMB * amp[kind])) for kind in amp}
    dist = float(np.mean([s["distance"] for s in per]))

    meta = {"command": command_line("torsion_signal.py", argv), **machine_info()}
    lines = ["# Cumulene: the end-to-end torsion signal of the two long-range kinds", "",
             f"Command: `{meta['command']}` (commit {(meta.get('git_commit') or '?')[:10]})", "",
             f"{len(frames)} frames of C8H4; terminal C–C distance {dist:.2f} Å (mean over {len(per)} frames); "
             f"Gaussian smearing σ = {args.smearing:g} Å. Fit of the reference energy: E(θ) = a + b cos 2θ with "
             f"b = {b:+.3f} eV (E(0°) − E(90°) = {span:.3f} eV, {1000 * span / len(frames[0]):.0f} meV/atom); the "
             f"residual's standard deviation is {resid.std():.3f} eV.", "",
             "Reading at one terminal carbon of a unit traceless quadrupole (|Θ| = 1 e·Å², a line normal to the "
             "chain axis) on the other, read with a unit quadrupole turned by the torsion θ (e/Å per (e·Å²)²; "
             f"× COULOMB = {COULOMB:.2f} eV·Å/e² for eV):", "",
             "| torsion θ | `multipole`: ½ Θ_B : G_A (r⁻⁵) | `lorem`: Θ_B : Ψ_A (r⁻¹) |", "|---|---|---|"]
    for j, deg in enumerate(ANGLES):
        lines.append(f"| {deg:g}° | {mean['multipole'][j]:+.3e} | {mean['lorem'][j]:+.3e} |")
    lines += ["", f"Amplitude 0° → 90°: `multipole` {amp['multipole']:.3e}, `lorem` {amp['lorem']:.3e}: the "
              f"`lorem` kind reads the far end's orientation **{amp['lorem'] / amp['multipole']:.0f}×** more "
              "strongly per unit of quadrupole.", "",
              f"To carry the {span:.2f} eV torsion energy by this end-to-end term alone, each end would need "
              f"|Θ| ≈ {need['multipole']:.0f} e·Å² with `multipole` against {need['lorem']:.1f} e·Å² with `lorem`.", ""]
    models = {}
    if args.models:
        chosen = [frames[k] for k in np.linspace(0, len(frames) - 1, min(args.model_frames, len(frames))).astype(int)]
        ref = _slope(np.cos(2 * np.radians([f.info["theta"] for f in chosen])), [f.get_potential_energy() for f in chosen])
        for spec in args.models:
            label, sep, path = spec.partition("=")
            if not sep or not path:
                raise SystemExit(f"--models: expected LABEL=PATH, got {spec!r}")
            models[label] = torsion_paths(path, chosen)
        lines += [f"## Where trained `multipole` models take the torsion energy from ({len(chosen)} frames)", "",
                  f"Slope of each energy on cos 2θ (eV; the reference's is {ref:+.3f}). The electrostatic energy is "
                  "split into atom pairs by distance (every channel, with its coupling; the pairs add up to the "
                  "block's electrostatic energy within the largest difference listed), and computed from the "
                  "charges, dipoles or quadrupoles alone (the rest is their cross terms).", "",
                  "| model | placement, charge channels | total | electrostatic | block readout | rest (local) | "
                  + " | ".join(f"pairs {lo:g}–{hi:g} Å" if math.isfinite(hi) else f"pairs ≥ {lo:g} Å"
                               for lo, hi in PAIR_BINS) + " | q alone | μ alone | Θ alone | pairs − block (eV) |",
                  "|---|---|---|---|---|---|" + "---|" * len(PAIR_BINS) + "---|---|---|---|"]
        for label, r in models.items():
            sl = r["slope"]
            lines.append(f"| {label} | {r['placement']}, {r['charge_channels']} | {sl['total']:+.3f} | "
                         f"{sl['electrostatic']:+.3f} | {sl['readout']:+.3f} | {sl['rest']:+.3f} | "
                         + " | ".join(f"{x:+.3f}" for x in r["pair_slopes"]) + " | "
                         + " | ".join(f"{r['rank_slopes'][k]:+.3f}" for k in ("q", "mu", "theta"))
                         + f" | {r['pairs_minus_block_max_eV']:.1e} |")
        lines += ["", "Reading: a model whose electrostatic slope sits in the pairs closer than 4 Å does not use the "
                  "end-to-end term above; it forms the product of the two ends' orientations between neighbouring "
                  "atoms, Θ_i : T(r_ij) : Θ_j, from features that each know one end well. After the last layer the "
                  "bonded central carbons are such a pair (each hears of its own end's hydrogens through neighbours "
                  "that see them at 2–3 Å). A local model can represent the same product inside one atom's "
                  "second-layer features, from messages that the cutoff envelope damps, and learns it late if at all "
                  "(see converged.end_all.cumulene.md: the floor is a plateau of training, not a limit of the "
                  "receptive field). With the block before the last layer its sources have first-layer features, "
                  "in which the atoms that see one end's hydrogens within 3.3 Å are 3.9 Å or more from those that "
                  "see the other's, where the quadrupole coupling is far weaker than across a bond.", ""]
    data = {"meta": meta, "models": models, "fit": {"a": float(a0), "b": float(b), "span_eV": span, "residual_std_eV": float(resid.std())},
            "distance": dist, "angles": list(ANGLES), "mean": mean, "amplitude": amp, "quadrupole_needed": need,
            "frames": [int(k) for k in picks]}
    path = write_json_md(args.out, data, "\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
