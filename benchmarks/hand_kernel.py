"""Could a hand-written kernel take over the compiled step's molecule field sum? (issue 12)

The compiled ``multipole`` training step sums the learned multipoles' fields over each molecule's pairs with
Inductor's code for :func:`cartlorem.ewald.direct.traced_pair_fields`: per pair a 9 × 9 coupling matrix K applied
to the gathered sources of both ends (2 C_lr = 8 channels), scattered back to the atoms. With 8 channels Inductor's
AVX-512 code runs the channel loop as scalar code. This script answers two questions:

1. **How much faster is a hand-written loop?** ``forward``: the sum's forward alone (out[i] += K x[j] and
   out[j] += (±K) x[i] over the unordered pairs of the trainer's first batch), as a C++ loop built with
   ``torch.utils.cpp_extension.load_inline`` (-O3 -march=native; 2C channels a compile-time constant, so the
   compiler vectorises them), against the same sum compiled by Inductor from the library's form, and eagerly.
   Medians of process CPU time, interleaved, one thread. Needs a C++ compiler and ninja; skipped otherwise.
2. **Can such a kernel enter the compiled step?** It needs its derivatives to second order inside
   ``torch.func.grad`` (the loss) of ``torch.func.vjp`` (the forces), compiled whole by ``torch.compile``.
   ``probes`` tries the two ways torch offers to give an opaque op a hand-written backward, on a toy op
   ``y = k x`` whose backward calls the op again (so that it is differentiable twice): a ``torch.library``
   custom op with ``register_autograd``, and a ``torch.autograd.Function`` with ``setup_context`` around a
   custom op. Each is run eagerly and compiled, at first order (the energy's gradient) and at second order (the
   step's shape), and the gradient compared with plain ops.

Usage::

    PYTHONPATH=$PWD python3 benchmarks/hand_kernel.py --data-dir /work/shared/data --out benchmarks/results/hand_kernel
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch
from torch.library import custom_op

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

_SOURCE = r"""
#include <torch/extension.h>

// out[i] += K x[j], out[j] += (row_parity K col_parity) x[i] over unordered pairs (i, j); K [P, 9, 9],
// x [N, 9, C], parities [9]
template <int C>
static void pair_sum(const float* K, const float* x, const int64_t* I, const int64_t* J, const float* rp,
                     const float* cp, float* out, int64_t n_pairs) {
  constexpr int W = 2 * C;
  for (int64_t p = 0; p < n_pairs; ++p) {
    const int64_t i = I[p], j = J[p];
    const float* k = K + p * 81;
    float xs[9][W];
    for (int b = 0; b < 9; ++b)
      for (int c = 0; c < C; ++c) {
        xs[b][c] = x[(j * 9 + b) * C + c];
        xs[b][C + c] = cp[b] * x[(i * 9 + b) * C + c];
      }
    for (int a = 0; a < 9; ++a) {
      float acc[W] = {0};
      for (int b = 0; b < 9; ++b) {
        const float kab = k[a * 9 + b];
        for (int c = 0; c < W; ++c) acc[c] += kab * xs[b][c];
      }
      for (int c = 0; c < C; ++c) {
        out[(i * 9 + a) * C + c] += acc[c];
        out[(j * 9 + a) * C + c] += rp[a] * acc[C + c];
      }
    }
  }
}

torch::Tensor forward(torch::Tensor K, torch::Tensor x, torch::Tensor I, torch::Tensor J, torch::Tensor rp,
                      torch::Tensor cp) {
  TORCH_CHECK(x.size(2) == 4, "this prototype is built for C = 4 channels");
  TORCH_CHECK(K.is_contiguous() && x.is_contiguous() && I.is_contiguous() && J.is_contiguous() && rp.is_contiguous()
              && cp.is_contiguous(), "contiguous inputs only");
  TORCH_CHECK(K.scalar_type() == torch::kFloat && x.scalar_type() == torch::kFloat && I.scalar_type() == torch::kLong
              && J.scalar_type() == torch::kLong, "float32 sums, int64 pair indices");
  TORCH_CHECK(K.size(1) == 9 && K.size(2) == 9 && x.size(1) == 9 && rp.numel() == 9 && cp.numel() == 9,
              "rank 0-2 sources and fields: 9 x 9 coupling matrices");
  auto out = torch::zeros_like(x);
  pair_sum<4>(K.data_ptr<float>(), x.data_ptr<float>(), I.data_ptr<int64_t>(), J.data_ptr<int64_t>(),
              rp.data_ptr<float>(), cp.data_ptr<float>(), out.data_ptr<float>(), K.size(0));
  return out;
}
"""


def library_forward(K, x, i, j, row_parity, col_parity):
    """The library's form of the forward (:func:`cartlorem.ewald.direct._field_sum_reference`, traced)."""
    from cartlorem.ewald.direct import _gather, _scatter

    xs = _gather(x, j, i, col_parity, True)
    return _scatter((K[..., None] * xs[:, None]).sum(2), x.shape[0], i, j, row_parity, True)


def time_forward(args) -> dict:
    import train_step

    from cartlorem.ewald.direct import _coupling_table, molecule_pairs

    batch = train_step.make_batches(args.set, args)[0][0]
    n = batch.positions.shape[0]
    i, j = molecule_pairs(batch.batch, unordered=True)
    g = torch.Generator().manual_seed(0)
    K, x = torch.randn(i.shape[0], 9, 9, generator=g), torch.randn(n, 9, 4, generator=g)
    t = _coupling_table((0, 1, 2), (0, 1, 2), torch.float32, torch.device("cpu"), True)
    rp, cp = t.row_parity, t.col_parity
    row = {"set": args.set, "atoms": n, "pairs": int(i.shape[0])}
    fns = {"eager": lambda: library_forward(K, x, i, j, rp, cp)}
    compiled = torch.compile(library_forward, dynamic=False, fullgraph=True)
    fns["inductor"] = lambda: compiled(K, x, i, j, rp, cp)
    if shutil.which("ninja") is None or shutil.which("c++") is None:
        row["cpp_note"] = "not built: no C++ compiler or ninja"
    else:
        from torch.utils.cpp_extension import load_inline

        t0 = time.perf_counter()
        ext = load_inline("cartlorem_hand_kernel", cpp_sources=_SOURCE, functions=["forward"],
                          extra_cflags=["-O3", "-march=native"])
        row["cpp_build_s"] = round(time.perf_counter() - t0, 1)
        rpf, cpf = rp.flatten().contiguous(), cp.flatten().contiguous()
        fns["cpp"] = lambda: ext.forward(K, x, i, j, rpf, cpf)
    ref = fns["eager"]()
    for name, fn in fns.items():
        row[f"{name}_diff"] = float((fn() - ref).abs().max() / ref.abs().max())
    for name, res in harness.time_fns(fns, warmup=args.warmup, repeats=args.repeats).items():
        row[f"{name}_ms"] = round(res["cpu_median"] * 1e3, 3)
    return row


def _toy_op(name: str):
    """The toy op ``y = k x`` as a torch.library custom op ``cartlorem_probe::<name>``, with its fake (shape) rule."""
    def mul(k: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return k * x

    op = custom_op(f"cartlorem_probe::{name}", mul, mutates_args=())
    op.register_fake(lambda k, x: torch.empty_like(x))
    return op


#: no autograd of its own (inside :class:`_Mul`)
_mul = _toy_op("mul")
#: with a backward registered by ``register_autograd`` (which calls the op again), below
_mul_with_grad = _toy_op("mul_with_grad")


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, g):
    k, x = ctx.saved_tensors
    return _mul_with_grad(g, x), _mul_with_grad(g, k)


_mul_with_grad.register_autograd(_backward, setup_context=_setup)


class _Mul(torch.autograd.Function):
    """The toy op as an autograd.Function (functorch style: ``setup_context``) whose backward applies it again."""

    @staticmethod
    def forward(k, x):
        return _mul(k, x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, g):
        k, x = ctx.saved_tensors
        return _Mul.apply(g, x), _Mul.apply(g, k)


def probes() -> list:
    """The toy op under torch.func.grad, eagerly and compiled, at first order (the gradient of the energy) and at
    second order (the gradient of energy + Σ force², the force a vjp in the positions: the training step's shape):
    each way's error or largest gradient difference from plain ops."""
    ways = {"plain ops": lambda k, x: k * x, "custom op, register_autograd": _mul_with_grad,
            "autograd.Function, setup_context": _Mul.apply}

    def first_order(op):
        return lambda p, r: op(p * r, r.sin()).sum()

    def second_order(op):
        def loss(p, r):
            e, vjp = torch.func.vjp(lambda y: op(p * y, y.sin()).sum(), r)
            force = vjp(torch.ones_like(e))[0]
            return e + (force * force).sum()
        return loss

    g = torch.Generator().manual_seed(0)
    p, r = torch.randn(5, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    rows = []
    for name, op in ways.items():
        row = {"way": name}
        for order, make in (("first", first_order), ("second", second_order)):
            reference = torch.func.grad(make(ways["plain ops"]))(p, r)
            for mode in ("eager", "compiled"):
                fn = torch.func.grad(make(op))
                if mode == "compiled":
                    torch._dynamo.reset()
                    fn = torch.compile(fn, fullgraph=True)
                try:
                    row[f"{order}_{mode}"] = f"gradient off by {float((fn(p, r) - reference).abs().max()):.3g}"
                except Exception as exc:  # what happens is the result: recorded, not raised
                    lines = [x for x in str(exc).splitlines() if x.strip()] or [type(exc).__name__]
                    row[f"{order}_{mode}"] = f"{type(exc).__name__}: {' / '.join(lines[:2])[:200]}"
        rows.append(row)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_data_argument(p)
    p.add_argument("--set", default="cumulene")
    p.add_argument("--batch-size", type=int, default=8, help="structures in the batch (the trainer's first)")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    args.cutoff, args.n_batches, args.max_frames, args.test_fraction = 5.0, 1, 0, 0.2
    torch.set_num_threads(1)
    row = time_forward(args)
    print(row, flush=True)
    ways = probes()
    for w in ways:
        print(w, flush=True)
    meta = harness.machine_info()
    meta["command"] = "python3 benchmarks/hand_kernel.py " + " ".join(argv if argv is not None else sys.argv[1:])
    columns = [("set", "set"), ("atoms", "atoms"), ("pairs", "pairs")]
    for name in ("eager", "inductor", "cpp"):
        if f"{name}_ms" in row:
            columns += [(f"{name} ms", f"{name}_ms"), (f"{name} rel. diff", f"{name}_diff")]
    md = (f"# A hand-written field-sum kernel\n\n{meta}\n\n## The sum's forward alone (process CPU ms per call, "
          "medians, interleaved)\n\n" + harness.markdown_table([row], columns)
          + f"\n\n{row.get('cpp_note', '')}\n\n## Hand-written derivatives inside the compiled step's transforms "
          "(toy op y = k x; first order: the gradient of the energy; second order: of e + Σ force²; against plain ops)\n\n"
          + harness.markdown_table(ways, [("way", "way")] + [(f"{o} order, {m}", f"{o}_{m}") for o in ("first", "second")
                                                             for m in ("eager", "compiled")]) + "\n")
    harness.write_results("hand_kernel", [row] + ways, meta, md, args.out)


if __name__ == "__main__":
    main()
