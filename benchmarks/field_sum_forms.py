"""Other ways to write the compiled training step's open-molecule field sum, against the library's (issue 12).

The compiled ``multipole`` step sums the fields of the learned q, μ, Θ over each molecule's pairs with
:func:`cartlorem.ewald.direct.traced_pair_fields` (each pair once, rank 2 in five components, the pair features
linearised): per pair a 9 × 9 coupling matrix K applied to the gathered sources of both ends, and the results
scattered back to the atoms. This script times that sum, in the shape of a training step (the electrostatic
energy, its force by a vjp in the positions, and the gradient of energy + Σ force² in the multipoles, as
``train_step.py --field-sum`` does), against other forms of the same sum, each compiled by Inductor:

* ``pairs``: the library's form (a broadcast product of K and the gathered sources, summed);
* ``pairs_bmm``: the same with ``torch.bmm`` for K @ x;
* ``pairs_last``: every per-pair tensor with the pairs as the last (vectorised) dimension: features [F, P],
  K [81, P], sources gathered as [9, 2C, P];
* ``pairs_padded``: the library's form with the gathered sources' 2C channels zero-padded to the width of the CPU's
  float vectors (16 with AVX-512), so that Inductor vectorises the channel loop it otherwise runs as scalar code
  (2C = 8 at C_lr = 4); the padding is sliced off before the scatter;
* ``dense``: no pair list: each structure's atoms in a padded [B, n] block, the features of every ordered pair
  [B, n, n, F] and the sum as one batched GEMM per structure, ``y = feat [B, n, n F] @ Z [B, n F, 9 C]`` with
  ``Z = coef @ sources`` per atom (no scatters; padding and i = j masked).

Every compiled form is checked against the library's form run eagerly (largest difference of the gradients,
relative to their largest element; before session 29 the eager forms were compared).
Medians of process CPU time after warm-up, the forms interleaved, one thread::

    PYTHONPATH=$PWD python3 benchmarks/field_sum_forms.py --data-dir /work/shared/data --sets cumulene dimers \
        --out benchmarks/results/field_sum_forms
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

FORMS = ("pairs", "pairs_bmm", "pairs_last", "pairs_padded", "dense")


def _table(dtype):
    from cartlorem.ewald.direct import _coupling_table

    return _coupling_table((0, 1, 2), (0, 1, 2), dtype, torch.device("cpu"), True)


def _packed(q, mu, th):
    """Sources [N, 9, C]: q, μ, the five STF_BASIS components of Θ (what pair_list_fields builds)."""
    from cartlorem.ewald.direct import STF_BASIS

    n, c = q.shape
    basis = STF_BASIS.to(q)
    return torch.cat([q[:, None], mu.transpose(1, 2), basis @ th.reshape(n, c, 9).transpose(1, 2)], dim=1)


def _unpacked(out):
    """[N, 9, C] → (potential [N, C], field [N, C, 3], gradient [N, C, 3, 3])."""
    from cartlorem.ewald.direct import STF_BASIS

    n, _, c = out.shape
    basis = STF_BASIS.to(out)
    return out[:, 0], out[:, 1:4].transpose(1, 2), (basis.T @ out[:, 4:9]).transpose(1, 2).reshape(n, c, 3, 3)


def pairs_bmm(pos, pairs, q, mu, th, kernel):
    """The library's sum with K @ x as torch.bmm."""
    from cartlorem.ewald.direct import _gather, _linearized_features, _scatter

    t, (i, j) = _table(pos.dtype), pairs
    features = _linearized_features(pos[i] - pos[j], kernel, t)
    K = (features @ t.coef).reshape(-1, t.n_rows, t.n_cols)
    y = torch.bmm(K, _gather(_packed(q, mu, th), j, i, t.col_parity, True))
    return _unpacked(_scatter(y, pos.shape[0], i, j, t.row_parity, True))


def _vector_width(dtype) -> int:
    """Lanes of the CPU's vectors for ``dtype`` as Inductor picks them (16 floats with AVX-512; 1 without vectors)."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    isa = pick_vec_isa()
    return int(isa.nelements(dtype)) if isa else 1


def pairs_padded(pos, pairs, q, mu, th, kernel, lanes=16):
    """The library's sum with the gathered sources' channels zero-padded to a multiple of ``lanes`` (the CPU's float
    vector width, :func:`_vector_width`, found outside the traced function)."""
    from cartlorem.ewald.direct import _gather, _linearized_features, _scatter

    t, (i, j) = _table(pos.dtype), pairs
    K = (_linearized_features(pos[i] - pos[j], kernel, t) @ t.coef).reshape(-1, t.n_rows, t.n_cols)
    x = _gather(_packed(q, mu, th), j, i, t.col_parity, True)  # [P, 9, 2C]
    width = x.shape[2]
    pad = -width % lanes
    x = torch.cat([x, x.new_zeros(x.shape[0], x.shape[1], pad)], dim=2)
    y = (K[..., None] * x[:, None]).sum(2)[..., :width]
    return _unpacked(_scatter(y, pos.shape[0], i, j, t.row_parity, True))


def pairs_last(pos, pairs, q, mu, th, kernel):
    """The library's sum with the pairs as the last dimension of every per-pair tensor."""
    t, (i, j) = _table(pos.dtype), pairs
    R = (pos.index_select(0, i) - pos.index_select(0, j)).T  # [3, P]
    R0, P = R.detach(), R.shape[1]
    r2 = (R0 * R0).sum(0)
    B = torch.stack(kernel.derivatives_autograd(r2, torch.ones_like(r2, dtype=torch.bool), t.max_order + 1,
                                                dense=True), dim=0)  # [orders, P]
    mono = torch.ones_like(R0[:1])
    for lower, axes in t.steps:
        mono = torch.cat([mono, mono.index_select(0, lower) * R0.index_select(0, axes)], dim=0)
    F = t.orders.shape[0]
    feat = B.index_select(0, t.orders) * mono.index_select(0, t.columns)  # [F, P]
    G = (B.index_select(0, t.grad_orders) * mono.index_select(0, t.grad_columns)).view(4, F, P) * t.grad_coef[..., None]
    feat = feat + ((R - R0)[:, None] * (G[:3] + R0[:, None] * G[3:])).sum(0)  # linearised, as the library's
    K = (t.coef.T @ feat).view(t.n_rows, t.n_cols, 1, P)
    v = _packed(q, mu, th).permute(1, 2, 0)  # [9, C, N]
    x = torch.cat([v.index_select(2, j), v.index_select(2, i) * t.col_parity[..., None]], dim=1)  # [9, 2C, P]
    y = (K * x[None]).sum(1)  # [9, 2C, P]
    c = y.shape[1] // 2
    out = y.new_zeros(t.n_rows, c, pos.shape[0]).index_add(2, i, y[:, :c])
    out = out.index_add(2, j, y[:, c:] * t.row_parity[..., None])
    return _unpacked(out.permute(2, 0, 1))


def dense_layout(batch):
    """(slots [B, n] atom of each padded slot, mask [B, n], slot [N] of each atom) for :func:`dense`."""
    counts = torch.bincount(batch)
    n_struct, n = counts.numel(), int(counts.max())
    order = torch.argsort(batch, stable=True)
    local = torch.arange(batch.numel()) - (torch.cumsum(counts, 0) - counts).repeat_interleave(counts)
    flat = batch[order] * n + local
    slots = torch.zeros(n_struct * n, dtype=torch.long)
    mask = torch.zeros(n_struct * n, dtype=torch.bool)
    slots[flat], mask[flat] = order, True
    slot = torch.empty_like(batch)
    slot[order] = flat
    return slots.view(n_struct, n), mask.view(n_struct, n), slot


def dense(pos, layout, q, mu, th, kernel):
    """The sum per structure in a padded block: features of every ordered pair, one batched GEMM."""
    from cartlorem.ewald.direct import _linearized_features

    t, (slots, mask, slot) = _table(pos.dtype), layout
    n_struct, n = slots.shape
    p = pos.index_select(0, slots.flatten()).view(n_struct, n, 3)
    valid = (mask[:, :, None] & mask[:, None] & ~torch.eye(n, dtype=torch.bool)).reshape(-1)
    R = (p[:, :, None] - p[:, None]).reshape(-1, 3)
    # the library's linearised pair features; the kernel is finite at R = 0 (i = j, padding), masked here
    feat = _linearized_features(R, kernel, t) * valid[:, None]
    F, A, c = feat.shape[1], t.n_rows, q.shape[1]
    Z = t.coef.view(F, A, t.n_cols).reshape(F * A, t.n_cols) @ _packed(q, mu, th)  # [N, F A, C]
    Z = Z.index_select(0, slots.flatten()).view(n_struct, n * F, A * c)
    y = torch.bmm(feat.view(n_struct, n, n * F), Z)  # [B, n, A C]
    return _unpacked(y.view(n_struct * n, A, c).index_select(0, slot))


def step_shape(form, pos, batch, sources, smearing=1.0):
    """``torch.func.grad`` of energy + Σ force² in the sources (what ``train_step.field_sum_times`` times)."""
    from cartlorem.ewald.direct import molecule_pairs, traced_pair_fields
    from cartlorem.ewald.kernels import RadialKernel

    kernel = RadialKernel.smeared(smearing)
    pairs = molecule_pairs(batch, unordered=True)
    lanes = _vector_width(pos.dtype) if form == "pairs_padded" else 1
    layout = dense_layout(batch)

    def fields(y, q, mu, th):
        if form == "pairs":
            return traced_pair_fields(y, pairs, q, mu, th, smearing=smearing, traceless_gradient=True, linearized=True)
        if form == "dense":
            return dense(y, layout, q, mu, th, kernel)
        if form == "pairs_padded":
            return pairs_padded(y, pairs, q, mu, th, kernel, lanes)
        return {"pairs_bmm": pairs_bmm, "pairs_last": pairs_last}[form](y, pairs, q, mu, th, kernel)

    def loss(src, x):
        q, mu, th = src

        def energy(y):
            f = fields(y, q, mu, th)
            return (q * f[0]).sum() - (mu * f[1]).sum() - 0.5 * (th * f[2]).sum()

        force, e = torch.func.grad_and_value(energy)(x)
        return e + (force**2).sum()

    return lambda: torch.func.grad(loss)(sources, pos), torch.compile(torch.func.grad(loss), fullgraph=True,
                                                                      dynamic=False), pairs


def run_set(name, args):
    import train_step

    from cartlorem.ewald.direct import prepare_pair_table
    from cartlorem.tensors import stf

    dtype = getattr(torch, args.dtype)
    prepare_pair_table((0, 1, 2), (0, 1, 2), dtype, "cpu", traceless_gradient=True)
    batch = train_step.make_batches(name, args)[0][0]
    pos, n = batch.positions.to(dtype), batch.positions.shape[0]
    g = torch.Generator().manual_seed(args.seed)
    sources = (torch.randn(n, 4, generator=g).to(dtype), torch.randn(n, 4, 3, generator=g).to(dtype),
               stf(torch.randn(n, 4, 3, 3, generator=g).to(dtype)))
    row = {"set": name, "atoms": n, "structures": int(batch.batch.max()) + 1,
           "largest": int(torch.bincount(batch.batch).max())}
    ref, compiled = None, {}
    for form in args.forms:
        eager, fn, pairs = step_shape(form, pos, batch.batch, sources)
        row["pairs"] = int(pairs[0].numel())
        if ref is None:
            ref = eager()
        t0 = time.perf_counter()
        grads = fn(sources, pos)  # the compiled form, as timed, against the library's eager sum
        row[f"{form}_compile_s"] = round(time.perf_counter() - t0, 1)
        row[f"{form}_diff"] = float(max(((a - b).abs().max() / a.abs().max()) for a, b in zip(ref, grads)))
        compiled[form] = (lambda f: lambda: f(sources, pos))(fn)
    times = harness.time_fns(compiled, warmup=args.warmup, repeats=args.repeats)
    for form, t in times.items():
        row[f"{form}_ms"] = round(t["cpu_median"] * 1e3, 3)
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_data_argument(p)
    p.add_argument("--sets", nargs="+", default=["cumulene", "dimers"])
    p.add_argument("--forms", nargs="+", default=list(FORMS), choices=FORMS)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="structures in the batch (the trainer's first)")
    p.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                   help="an Inductor option for every form, as train_step.py --inductor (repeatable)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    import train_step

    for option in args.inductor:
        train_step.set_inductor_option(option)
    if args.forms[0] != "pairs":
        args.forms = ["pairs"] + [f for f in args.forms if f != "pairs"]
    # what train_step.make_batches reads: the first training batch of the fixed split
    args.cutoff, args.n_batches, args.max_frames, args.test_fraction = 5.0, 1, 0, 0.2
    torch.set_num_threads(1)
    rows = []
    for name in args.sets:
        rows.append(run_set(name, args))
        print(rows[-1], flush=True)
    meta = harness.machine_info()
    meta["command"] = "python3 benchmarks/field_sum_forms.py " + " ".join(argv if argv is not None else sys.argv[1:])
    columns = [("set", "set"), ("atoms", "atoms"), ("pairs", "pairs"), ("largest molecule", "largest")]
    for form in args.forms:
        columns += [(f"{form} ms", f"{form}_ms"), (f"{form} rel. diff", f"{form}_diff")]
    md = (f"# Forms of the compiled step's open-molecule field sum\n\n{meta}\n\nCompiled; process CPU ms per call "
          "(energy, force, gradient of energy + Σ force² in the sources), medians, forms interleaved.\n\n"
          + harness.markdown_table(rows, columns) + "\n")
    harness.write_results("field_sum_forms", rows, meta, md, args.out)


if __name__ == "__main__":
    main()
