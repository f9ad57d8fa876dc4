"""Cost of one training step (forward, backward of the force, backward of the loss) per long-range kind.

A training step with force labels is: energy forward → forces = −∂E/∂r (a backward with
``create_graph=True``) → loss → ``loss.backward()``, which differentiates the force graph again (the
double backward). This script times that step, exactly as ``cartlorem.training.loop`` runs it
(same model call, same ``weighted_loss``, same optimiser and gradient clipping), for the models
``none`` (short range only), ``multipole`` and ``lorem``, on fixed batches of the dimer and cumulene
sets (open-boundary molecules of 6–18 atoms), and breaks the time down:

* ``median_s``: median wall time of one step after warm-up, steps of all models interleaved (the
  load of a shared machine then hits every model alike, so their ratio holds);
* ``ratio_to_none``: the step time over the short-range model's, the quantity issue 12 targets (≤ 1.15);
* ``profile``: torch.profiler's top operators by self CPU time over a few steps, and the time spent
  inside ``batched_multipole_fields`` (forward ``lr_fields_fwd_s``; its share of the backward is not
  separable by the profiler, so ``lr_overhead_s`` = step(model) − step(none) is reported).

With ``--mace`` and the peers venv (``benchmarks/setup_peers.sh``), MACE at matched settings
(same channels, correlation, cutoff, 2 interactions) is timed in the peer interpreter on the same
batches and reported as another row. Its steps are **not** interleaved with the others: MACE runs in its own
process (another interpreter: the venvs cannot share one), after the cartlorem steps of the same set and C,
so its ratios (``ratio_to_mace``, MACE's ``ratio_to_none``) compare steps timed at different moments and
carry the load changes between them.

Example (what benchmarks/results/train_step.md was made with)::

    PYTHONPATH=$PWD python3 benchmarks/train_step.py --channels 16 32 --threads 1 --repeats 15

``--compare-ref REV`` times the local model's step with this tree's code against the code of git revision
REV (fused.py, chunked.py, blocks.py, model.py swapped in; same models, one process, interleaved) and
breaks both down by component and phase (:func:`local_breakdown`: forward, first backward, double
backward, optimiser; each backward operation charged to the forward part it differentiates)::

    PYTHONPATH=$PWD python3 benchmarks/train_step.py --sets dimers --channels 16 32 --compare-ref 17f29ed
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

KINDS = ("none", "multipole", "lorem")
#: Variants of the long-range sum, timed in the same run (the model is the same, only the code path differs):
#: "" this branch; "@ref": kernel derivatives op by op (RadialKernel.derivatives_autograd, the code before
#: issue 12); "@pair_fields": open molecules through the per-pair formulas of cartlorem.ewald.fields.pair_fields
#: op by op (the eager path before cartlorem.ewald.direct.PairListSum; still
#: the TorchScript path), applied by patching fields.open_molecules_fields.
#: "/zero-fields": the long-range sum replaced by zero fields that still depend on the charges and positions
#: (the rest of the block, its backward and double backward unchanged): step(kind) − step(kind/zero-fields) is
#: the cost of the Ewald/direct sum, step(kind/zero-fields) − step(none) the cost of the rest of the block.
#: "/zero-fields-detached": zero fields, and the block's input features detached from the local model (its
#: scalar output keeps the residual h0 attached), so no gradient flows from the block's maps into the local
#: model: step(kind/zero-fields) − step(kind/zero-fields-detached) is what the block costs the local model
#: (with placement "end", the backward and double backward of the last layer's rank-1 and rank-2 outputs,
#: which a short-range model does not compute: its last layer outputs scalars only),
#: step(kind/zero-fields-detached) − step(none) the block's own operations.
VARIANTS = ("", "@ref", "@pair_fields", "/zero-fields", "/zero-fields-detached")
#: "+compile": the compiled step of train(compile=True) (cartlorem.training.compiled), for every model kind
#: including none; its ratios ("÷ none") are to none+compile. Not in the default variants (minutes of
#: compilation per model). "+compile/zero-fields" and "+compile/zero-fields-detached": the compiled step with
#: the variant's zero fields (the split above, for the compiled step; each compiles anew). "+compile/unlinearized":
#: the compiled step with the open-molecule pair sum differentiated through the kernel (traced_pair_fields with
#: linearized=False, the form before session 25) instead of its first-order expansion.
ALL_VARIANTS = VARIANTS + ("+compile", "+compile/zero-fields", "+compile/zero-fields-detached", "+compile/unlinearized")


def _zero_fields(positions, batch, cell, pbc, charges=None, dipoles=None, quadrupoles=None, *, ranks=(0, 1, 2),
                 **_):
    """Stand-in for batched_multipole_fields: zeros of the right shapes, attached to the graph."""
    from cartlorem.ewald.fields import MultipoleFields

    z = charges * 0.0  # [N, C]
    return MultipoleFields(z if 0 in ranks else None,
                           z[..., None] * positions[:, None, :] if 1 in ranks else None,
                           z[..., None, None] * positions[:, None, :, None] * positions[:, None, None, :]
                           if 2 in ranks else None)


def _zero_traced_fields(positions, pairs, charges=None, dipoles=None, quadrupoles=None, *, ranks=(0, 1, 2), **_):
    """Stand-in for traced_pair_fields (the compiled step's field sum): :func:`_zero_fields`' zeros."""
    return tuple(_zero_fields(positions, None, None, None, charges, ranks=ranks))


def _open_molecules_per_pair(positions, batch, charges, dipoles, quadrupoles, *, smearing, accuracy, prefactor,
                             ranks=(0, 1, 2)):
    """The open-molecule sum by :func:`cartlorem.ewald.fields.pair_fields` (variant "@pair_fields")."""
    from cartlorem.ewald.fields import intra_pairs, pair_fields
    from cartlorem.ewald.kernels import RadialKernel

    i, j = intra_pairs(batch)
    R = positions[i] - positions[j]
    kernel = RadialKernel.coulomb() if smearing is None else RadialKernel.smeared(float(smearing))
    m = {r: t for r, t in enumerate((charges, dipoles, quadrupoles)) if t is not None}
    B = kernel.derivatives((R * R).sum(-1), torch.ones_like(R[:, 0], dtype=torch.bool), max(ranks) + max(m))
    out = pair_fields(R, i, positions.shape[0], *(None if t is None else t[j] for t in (charges, dipoles, quadrupoles)),
                      B, 0 in ranks, 1 in ranks, 2 in ranks)
    return tuple(None if x is None else prefactor * x for x in out)


@contextlib.contextmanager
def variant(name):
    """Apply a long-range code-path variant (see VARIANTS) for the duration of one step."""
    import cartlorem.ewald.fields as fields
    from cartlorem.ewald.kernels import RadialKernel

    import cartlorem.nn.long_range as long_range

    saved = (RadialKernel.derivatives, fields.open_molecules_fields, long_range.batched_multipole_fields,
             long_range.LongRangeBlock.forward, long_range.traced_pair_fields)
    if name.endswith("/zero-fields") or name.endswith("/zero-fields-detached"):
        long_range.batched_multipole_fields = _zero_fields
        long_range.traced_pair_fields = _zero_traced_fields
    if name.endswith("/zero-fields-detached"):
        forward = saved[3]

        def detached(self, h, *a, **k):
            hd = [None if x is None else x.detach() for x in h]
            out = forward(self, hd, *a, **k)
            out["scalars"] = out["scalars"] - hd[0] + h[0]  # the residual h0 → next layer stays attached
            return out

        long_range.LongRangeBlock.forward = detached
    if name.endswith("/unlinearized"):
        exact = saved[4]

        def unlinearized(*a, **k):
            return exact(*a, **{**k, "linearized": False})

        long_range.traced_pair_fields = unlinearized
    if name.endswith("@ref"):
        RadialKernel.derivatives = RadialKernel.derivatives_autograd
    if name.endswith("@pair_fields"):
        fields.open_molecules_fields = _open_molecules_per_pair
    try:
        yield
    finally:
        (RadialKernel.derivatives, fields.open_molecules_fields, long_range.batched_multipole_fields,
         long_range.LongRangeBlock.forward, long_range.traced_pair_fields) = saved


#: The files of the local training step whose code a reference run swaps in (module, classes and functions
#: whose attributes are replaced for the duration of a step): ``--compare-ref REF`` times this tree's step
#: against the same models running the code of git revision REF, in one process, steps interleaved.
LOCAL_FILES = (("cartlorem/tensors/fused.py", "cartlorem.tensors.fused", ()),
               ("cartlorem/tensors/chunked.py", "cartlorem.tensors.chunked", ()),
               ("cartlorem/nn/blocks.py", "cartlorem.nn.blocks", ("Interaction", "BodyOrderProduct", "SpeciesLinear")),
               ("cartlorem/model.py", "cartlorem.model", ("CartLorem",)))


def load_reference(ref):
    """The local-step modules of git revision ``ref``, executed as sibling modules of today's package
    (their relative imports resolve to today's package; the names they take from the swapped modules are
    rebound to the reference versions). Returns [(today's module, reference module, class names)]."""
    import importlib
    import types

    loaded, out = {}, []
    for path, name, classes in LOCAL_FILES:
        src = subprocess.run(["git", "show", f"{ref}:{path}"], cwd=harness.REPO_ROOT, capture_output=True,
                             text=True, check=True).stdout
        pkg = name.rsplit(".", 1)[0]
        mod = types.ModuleType(f"{pkg}._ref_{name.rsplit('.', 1)[1]}")
        mod.__package__ = pkg
        exec(compile(src, f"{ref}:{path}", "exec"), mod.__dict__)
        loaded[name] = mod
        out.append((importlib.import_module(name), mod, classes))
    for _, mod, _ in out:  # names imported from another swapped module → that module's reference version
        for key, value in list(vars(mod).items()):
            src_mod = getattr(value, "__module__", None)
            if src_mod in loaded and key in vars(loaded[src_mod]) and not isinstance(value, types.ModuleType):
                setattr(mod, key, vars(loaded[src_mod])[key])
    return out


@contextlib.contextmanager
def reference_code(modules):
    """Run the methods of the swapped classes (and the functions of the swapped modules the blocks call)
    from the reference modules of :func:`load_reference`; restores today's code on exit."""
    import types

    saved = []
    for today, ref, classes in modules:
        for cls_name in classes:
            cls, ref_cls = getattr(today, cls_name), getattr(ref, cls_name)
            for key, value in vars(ref_cls).items():
                if isinstance(value, (types.FunctionType, staticmethod, classmethod, property)):
                    saved.append((cls, key, vars(cls).get(key)))
                    setattr(cls, key, value)
    try:
        yield
    finally:
        for cls, key, value in reversed(saved):
            if value is None:
                delattr(cls, key)
            else:
                setattr(cls, key, value)


def local_breakdown(model, batches, dtype, n_steps=6, warmup=3, blocks=None, reference_loop=False):
    """Self CPU time of one training step of a local model by component and phase (torch.profiler).

    Forward ops are labelled with ``record_function`` around the model's parts (the message kernel, the
    radial MLP, ...); every backward op is charged to the forward op whose autograd node ran it (the
    profiler's sequence numbers), recursively, so the first backward (forces, ``create_graph=True``)
    and the second (``loss.backward()``, the double backward) are attributed to the part of the
    forward they differentiate. Phases: forward, first backward (``torch.autograd.grad`` in
    cartlorem.forces), second backward, optimiser (clipping + Adam). Returns rows
    {component, phase ms...} and per-phase op counts."""
    import collections

    import cartlorem.forces as forces_mod
    from torch.profiler import ProfilerActivity, profile, record_function

    if blocks is None:  # the module whose globals the Interaction methods read (a reference run: its copy)
        import cartlorem.nn.blocks as blocks
    patched = []

    def label(owner, attr, name):
        f = getattr(owner, attr)

        def g(*a, **k):
            with record_function("L:" + name):
                return f(*a, **k)
        patched.append((owner, attr, f, attr in vars(owner)))
        setattr(owner, attr, g)

    for t, layer in enumerate(model.layers):
        label(layer, "forward", "interaction: gather, scatter, rest")
        label(layer.linear_up, "forward", "linear layers")
        label(layer.linear_out, "forward", "linear layers")
        label(layer.radial, "forward", "radial MLP")
        label(model.products[t], "forward", "body-order product")
        label(model.mixers[t], "forward", "linear layers")
        label(model.skips[t], "forward", "species skip")
        label(model.readouts[t], "forward", "readouts")
    label(blocks, "compact_edge_product", "message kernel")
    if hasattr(blocks, "component_major_edge_product"):
        label(blocks, "component_major_edge_product", "message kernel")
        label(blocks, "compiled_component_major_edge_product", "message kernel")
    label(blocks, "sym_to_compact", "compact <-> 3x3")
    label(blocks, "compact_to_sym", "compact <-> 3x3")
    import cartlorem.model as model_mod
    if hasattr(model_mod, "mix_node_features"):  # the mixers, called without their forward
        label(model_mod, "mix_node_features", "linear layers")
    label(model.radial_basis, "forward", "edge geometry (basis, envelope)")
    label(model.envelope, "forward", "edge geometry (basis, envelope)")

    class _Grad:  # torch.autograd.grad as cartlorem.forces calls it, inside a phase label
        def __getattr__(self, key):
            return getattr(torch.autograd, key)

        @staticmethod
        def grad(*a, **k):
            with record_function("P:first backward"):
                return torch.autograd.grad(*a, **k)

    class _Torch:
        autograd = _Grad()

        def __getattr__(self, key):
            return getattr(torch, key)

    saved_torch = forces_mod.torch
    forces_mod.torch = _Torch()
    from cartlorem.training.loss import weighted_loss

    weights = {"energy": 10.0, "forces": 1.0, "stress": 0.0}
    params = [p for p in model.parameters() if p.requires_grad]
    opt, backward, clip = _loop_parts(params, reference_loop)
    bs = [b.to(dtype=dtype) for b in batches]
    state = {"k": 0}
    model.train()

    def step():
        batch = bs[state["k"] % len(bs)]
        state["k"] += 1
        with record_function("P:forward"):
            pred = model(batch, compute_forces=True, compute_stress=False, create_graph=True)
            loss, _ = weighted_loss(pred, batch, weights)
        opt.zero_grad(set_to_none=True)
        with record_function("P:second backward"):
            backward(loss)
        with record_function("P:optimiser"):
            clip()
            opt.step()

    try:
        for _ in range(warmup):
            step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(n_steps):
                step()
    finally:
        forces_mod.torch = saved_torch
        for owner, attr, f, own in reversed(patched):
            if own:
                setattr(owner, attr, f)
            else:
                delattr(owner, attr)

    def chain(e):
        while e is not None:
            yield e
            e = e.cpu_parent

    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    backward = "autograd::engine::evaluate_function"

    def component(e, seq_label):
        for a in chain(e):
            if a.name.startswith(backward):
                return seq_label.get(a.sequence_nr)
            if a.name.startswith("L:"):
                return a.name[2:]
        return None

    seq_label = {}
    for e in events:  # in time order: a backward node runs after the op that created it
        if e.name.startswith(backward) or e.name.startswith(("L:", "P:")):
            continue
        lab = component(e, seq_label)
        if lab is not None and e.sequence_nr >= 0 and e.sequence_nr not in seq_label:
            seq_label[e.sequence_nr] = lab
    phases = ("forward", "first backward", "second backward", "optimiser")
    table = collections.defaultdict(float)
    ops = collections.Counter()
    for e in events:
        if e.name.startswith(("L:", "P:")):
            continue
        phase = next((a.name[2:] for a in chain(e) if a.name.startswith("P:")), "other")
        lab = component(e, seq_label) or ("optimiser" if phase == "optimiser" else
                                          "other (loss, forces, geometry, autograd)")
        table[(lab, phase)] += e.self_cpu_time_total / 1e3 / n_steps
        ops[phase] += 1
    total = sum(table.values())
    rows = []
    for lab in sorted({k[0] for k in table}, key=lambda l: -sum(v for k, v in table.items() if k[0] == l)):
        row = {"component": lab, **{p: round(table.get((lab, p), 0.0), 2) for p in phases}}
        row["total_ms"] = round(sum(table.get((lab, p), 0.0) for p in phases + ("other",)), 2)
        row["share"] = round(row["total_ms"] / total, 3)
        rows.append(row)
    totals = {p: round(sum(v for k, v in table.items() if k[1] == p), 2) for p in phases}
    return {"rows": rows, "phase_ms": totals, "ops_per_step": {p: ops[p] // n_steps for p in phases},
            "profiled_ms_per_step": round(total, 2)}


def make_batches(name, args, species_out=None):
    """The first ``n_batches`` training batches of the fixed split (seeded order), collated, with slabs in compact
    cells as the trainer gives them (``cartlorem.nn.long_range.compact_slab_cells``; where that exists)."""
    import numpy as np

    from cartlorem.graph import collate

    try:
        from cartlorem.nn.long_range import compact_slab_cells
    except ImportError:  # code before session 26
        def compact_slab_cells(graph):
            return graph

    frames, graphs, species, train_idx, _, _ = harness.load_split(name, args)
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(train_idx)
    batches = [compact_slab_cells(collate([graphs[k] for k in order[b * args.batch_size:(b + 1) * args.batch_size]]))
               for b in range(args.n_batches)]
    stats_graphs = [graphs[k] for k in train_idx[:200]]
    return batches, species, stats_graphs


def build_model(kind, species, channels, args, stats_graphs):
    """kind: "none", "multipole" or "lorem", optionally with a placement of the long-range block in brackets,
    e.g. "multipole[end]" (long_range_options placement; none: the model's default), and after a slash the
    option end_features, e.g. "multipole[end/light]"."""
    from cartlorem import CartLorem
    from cartlorem.training.prepare import fit_statistics

    kind, _, placement = kind.partition("[")
    placement, _, end_features = placement.rstrip("]").partition("/")
    options = {"placement": placement} if placement else None
    if end_features:
        options["end_features"] = end_features
    if kind != "none" and getattr(args, "lr_channels", None) is not None:
        options = {**(options or {}), "lr_channels": args.lr_channels}
    torch.manual_seed(args.seed)
    model = CartLorem(species, cutoff=args.cutoff, long_range=None if kind == "none" else kind,
                      channels=channels, correlation=args.correlation, long_range_options=options)
    fit_statistics(model, stats_graphs)
    return model.to(device=torch.device(getattr(args, "device", "cpu")), dtype=getattr(torch, args.dtype))


def _loop_parts(params, reference_loop=False):
    """(optimiser, backward(loss), clip()) as ``cartlorem.training.loop`` has them: the loss backward for the
    parameters only, :func:`~cartlorem.training.loop.make_optimizer`, foreach clipping; with ``reference_loop``
    as 17f29ed's loop had them (the ``--compare-ref`` reference): a plain ``loss.backward()`` (into the
    positions too), torch's default Adam and clipping."""
    from cartlorem.training.loop import make_optimizer

    if reference_loop:
        return (torch.optim.Adam(params, lr=1e-4, amsgrad=True), lambda loss: loss.backward(),
                lambda: torch.nn.utils.clip_grad_norm_(params, 10.0))
    return (make_optimizer(params, 1e-4, 0.0, True), lambda loss: torch.autograd.backward(loss, inputs=params),
            lambda: torch.nn.utils.clip_grad_norm_(params, 10.0, foreach=True))


def step_fn(model, batches, dtype, path="", reference_loop=False):
    """A closure doing one training step on the next batch (cycling), as the training loop does
    (:func:`_loop_parts`; ``reference_loop``: as 17f29ed's loop did)."""
    from cartlorem.training.loss import weighted_loss

    weights = {"energy": 10.0, "forces": 1.0, "stress": 0.0}
    params = [p for p in model.parameters() if p.requires_grad]
    opt, backward, clip = _loop_parts(params, reference_loop)
    device = next(model.parameters()).device
    batches = [b.to(device=device, dtype=dtype) for b in batches]
    state = {"k": 0}
    model.train()

    def step():
        batch = batches[state["k"] % len(batches)]
        state["k"] += 1
        with variant(path):
            pred = model(batch, compute_forces=True, compute_stress=False, create_graph=True)
            loss, _ = weighted_loss(pred, batch, weights)
            opt.zero_grad(set_to_none=True)
            backward(loss)
        clip()
        opt.step()

    return step


def compiled_step_fn(model, batches, dtype, path=""):
    """:func:`step_fn` with the loss gradient of :class:`cartlorem.training.compiled.CompiledLossGradient` (what
    ``train(compile=True)`` runs). Returns (step, compile_s, diff): the first call compiles (its wall time is
    compile_s), diff compares its gradient on the first batch with the eager step's (same model, same dtype).
    ``path``: a variant ("/zero-fields" ...) active in every call (so that the compiled graph's guards hold)."""
    from cartlorem.training.compiled import CompiledLossGradient
    from cartlorem.training.loss import weighted_loss

    weights = {"energy": 10.0, "forces": 1.0, "stress": 0.0}
    params = [p for p in model.parameters() if p.requires_grad]
    opt, _, clip = _loop_parts(params)
    device = next(model.parameters()).device
    sync = harness.sync_fn(device) or (lambda: None)
    batches = [b.to(device=device, dtype=dtype) for b in batches]
    model.train()
    compiled = CompiledLossGradient(model, weights)

    def grad(batch):
        with variant(path):
            return compiled(batch)

    t0 = time.perf_counter()
    model.zero_grad(set_to_none=True)
    loss_c, _ = grad(batches[0])
    sync()
    compile_s = time.perf_counter() - t0
    g_c = [None if p.grad is None else p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)
    with variant(path):
        pred = model(batches[0], compute_forces=True, compute_stress=False, create_graph=True)
        loss_e, _ = weighted_loss(pred, batches[0], weights)
        g_e = torch.autograd.grad(loss_e, params, allow_unused=True)
    scale = max(float(g.abs().max()) for g in g_e if g is not None and g.numel())  # lr_channels 1: empty couplings
    diff = {"loss_rel": float(abs(loss_c - loss_e.detach()) / abs(loss_e.detach())),
            "grad_rel": max(float((a - b).abs().max()) / scale for a, b in zip(g_c, g_e)
                            if a is not None and b is not None and a.numel()),
            "same_none": all((a is None) == (b is None) for a, b in zip(g_c, g_e))}
    state = {"k": 0}

    def step():
        batch = batches[state["k"] % len(batches)]
        state["k"] += 1
        grad(batch)
        clip()
        opt.step()

    return step, compile_s, diff


#: Kinds of work in a profiled step (:func:`step_breakdown`), in the order reported.
WORK_KINDS = ("guard checks", "graph wrapper", "fused kernels", "GEMMs", "optimiser and clipping", "other ops")


def work_kind(op: str) -> str:
    """The kind of work (:data:`WORK_KINDS`) of a profiler event: dynamo's guard checks before a compiled call, the
    Python wrapper of the compiled graph (its self time: launching kernels, allocating buffers; with Inductor's kernel
    profile off it also holds the fused kernels), the fused C++ kernels Inductor generated (``graph_N_cpp_fused_*``,
    visible with ``--kernel-profile``), the GEMMs it calls out to (mm, addmm, bmm), the optimiser step and gradient
    clipping, and every other op."""
    if op == "TorchDynamo Cache Lookup":
        return "guard checks"
    if op.startswith("## Call CompiledFxGraph"):
        return "graph wrapper"
    if op.startswith("graph_") and "_cpp_fused_" in op:
        return "fused kernels"
    if op in ("aten::mm", "aten::addmm", "aten::bmm"):
        return "GEMMs"
    if op.startswith("Optimizer.") or op in ("aten::_fused_adam_", "aten::_foreach_norm", "aten::_foreach_mul_",
                                             "aten::_foreach_add_"):
        return "optimiser and clipping"
    return "other ops"


def step_breakdown(events, n_steps: int) -> dict:
    """{kind of work: self CPU ms per step} over profiler events (objects with ``key`` and ``self_cpu_time_total``
    in µs), by :func:`work_kind`."""
    out = dict.fromkeys(WORK_KINDS, 0.0)
    for e in events:
        out[work_kind(e.key)] += e.self_cpu_time_total / 1e3 / n_steps
    return {k: round(v, 3) for k, v in out.items()}


def profile_step(step, n_steps=4, top=12):
    """torch.profiler over ``n_steps`` steps: top ops by self CPU time, the step by kind of work
    (:func:`step_breakdown`), and the forward time in the long-range field sum (``record_function`` around
    ``batched_multipole_fields``, eager steps)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n_steps):
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    ops = [{"op": e.key, "self_ms_per_step": round(e.self_cpu_time_total / 1e3 / n_steps, 3),
            "share": round(e.self_cpu_time_total / total, 3), "calls_per_step": e.count // n_steps}
           for e in rows]
    lr = [e for e in events if e.key == "lr_fields_fwd"]
    lr_fwd = lr[0].cpu_time_total / 1e6 / n_steps if lr else 0.0
    return {"top_ops": ops, "breakdown_ms": step_breakdown(events, n_steps), "lr_fields_fwd_s": round(lr_fwd, 5) if lr else None,
            "profiled_total_s": round(total / 1e6 / n_steps, 5)}


def field_sum_times(batch, dtype, channels=4, smearing=1.0, repeats=30, warmup=5, compile=True):
    """The compiled training step's open-molecule field sum alone (:func:`cartlorem.ewald.direct.traced_pair_fields`,
    as the ``multipole`` block calls it: C_lr = ``channels`` seeded random q, μ, Θ on the atoms of ``batch``, each
    intra-structure pair once, the gradient's traceless part, the pair features linearised; before session 28 the
    sum was timed without ``linearized``) in the shape of a training step: the electrostatic
    energy, its force (a vjp in the positions), and the gradient in the multipoles of energy + Σ force²
    (``torch.func.grad`` of that). Medians of process CPU time (ms) eager and, with ``compile``, compiled by
    Inductor (first call: compile seconds)."""
    from cartlorem.ewald.direct import molecule_pairs, traced_pair_fields
    from cartlorem.tensors import stf

    g = torch.Generator().manual_seed(0)
    pos = batch.positions.to(dtype)
    n = pos.shape[0]
    src = (torch.randn(n, channels, generator=g).to(dtype), torch.randn(n, channels, 3, generator=g).to(dtype),
           stf(torch.randn(n, channels, 3, 3, generator=g).to(dtype)))
    pairs = molecule_pairs(batch.batch, unordered=True)

    def loss(sources, x):
        q, mu, th = sources

        def energy(y):
            f = traced_pair_fields(y, pairs, q, mu, th, smearing=smearing, traceless_gradient=True, linearized=True)
            return (q * f[0]).sum() - (mu * f[1]).sum() - 0.5 * (th * f[2]).sum()

        force, e = torch.func.grad_and_value(energy)(x)
        return e + (force ** 2).sum()

    fn = torch.func.grad(loss)
    out = {"pairs": int(pairs[0].numel()), "atoms": n, "channels": channels}
    for mode in ("eager", "compiled") if compile else ("eager",):
        f = fn if mode == "eager" else torch.compile(fn, fullgraph=True, dynamic=False)
        t0 = time.perf_counter()
        f(src, pos)
        if mode == "compiled":
            out["compile_s"] = round(time.perf_counter() - t0, 1)
        t = harness.time_fn(lambda: f(src, pos), warmup=warmup, repeats=repeats)
        out[f"{mode}_ms"] = round(t["cpu_median"] * 1e3, 3)
    return out


def set_inductor_option(option: str) -> None:
    """``KEY=VALUE`` (``--inductor``) set on ``torch._inductor.config``: KEY an option, dotted for a section
    (``cpp.simdlen``), VALUE a Python literal (``True``, ``8``, ``'CPP,ATEN'``) or else taken as a string."""
    import ast

    import torch._inductor.config as inductor_config

    key, sep, value = option.partition("=")
    if not sep or not key:
        raise SystemExit(f"--inductor takes KEY=VALUE, got {option!r}")
    *path, name = key.split(".")
    owner = inductor_config
    for part in path:
        owner = getattr(owner, part, None)
        if owner is None:
            raise SystemExit(f"--inductor {option!r}: torch._inductor.config has no section {part!r}")
    if not hasattr(owner, name):
        raise SystemExit(f"--inductor {option!r}: torch._inductor.config has no option {key!r}")
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        parsed = value
    setattr(owner, name, parsed)


def _label_lr_fields():
    """Wrap the long-range block's field call in a profiler label (benchmark-only, no behaviour change)."""
    import cartlorem.nn.long_range as lr

    original = lr.batched_multipole_fields

    def labelled(*a, **k):
        with torch.profiler.record_function("lr_fields_fwd"):
            return original(*a, **k)

    lr.batched_multipole_fields = labelled


def mace_step_time(name, channels, args):
    """Median MACE step time at matched settings, run in the peers venv (None, reason) if absent."""
    python, why = harness.peer_python()
    if python is None:
        return None, why
    cmd = [python, __file__, "--mace-child", name, "--channels", str(channels)] + _common_flags(args)
    env = dict(os.environ, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(harness.REPO_ROOT), os.environ.get("PYTHONPATH")])))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        return None, f"MACE child failed: {r.stderr.strip()[-400:]}"
    return json.loads(r.stdout.strip().splitlines()[-1]), None


def _common_flags(args):
    return ["--data-dir", str(args.data_dir), "--device", args.device, "--correlation", str(args.correlation), "--batch-size",
            str(args.batch_size), "--n-batches", str(args.n_batches), "--threads", str(args.threads),
            "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--dtype", args.dtype,
            "--seed", str(args.seed), "--cutoff", str(args.cutoff)]


def run_mace_child(args):
    torch.set_num_threads(args.threads)
    torch.set_default_dtype(getattr(torch, args.dtype))
    name, channels = args.mace_child, args.channels[0]
    batches, species, stats_graphs = make_batches(name, args)
    mace = harness.build_mace(species, channels=channels, cutoff=args.cutoff, correlation=args.correlation)
    device = torch.device(args.device)
    model = harness.MaceModel(mace, species).to(device=device, dtype=getattr(torch, args.dtype))
    t = harness.time_fn(step_fn(model, batches, getattr(torch, args.dtype)), warmup=args.warmup,
                        repeats=args.repeats, sync=harness.sync_fn(device))
    print(json.dumps({"median_s": t["median"], "iqr_s": t["iqr"], "cpu_median_s": t["cpu_median"]}))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_data_argument(p)
    p.add_argument("--sets", nargs="+", default=["dimers", "cumulene"])
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    p.add_argument("--placements", nargs="+", default=[""], choices=["", "before_last", "end", "end/light"],
                   help="placements of the long-range block to time ('' the model's default, end; end/light: at "
                        "the end with long_range_options end_features 'light'); a placement other than the "
                        "default is reported as e.g. multipole[end]")
    p.add_argument("--channels", nargs="+", type=int, default=[16, 32])
    p.add_argument("--lr-channels", type=int, default=None,
                   help="long_range_options lr_channels of the long-range kinds (default: the block's, 4)")
    p.add_argument("--correlation", type=int, default=2)
    p.add_argument("--cutoff", type=float, default=5.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--n-batches", type=int, default=6, help="distinct batches cycled through")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=ALL_VARIANTS,
                   help="long-range code paths to time ('' this branch, '@ref' op-by-op kernels, '@pair_fields' "
                        "per-pair formulas op by op (the earlier open-molecule sum), '/zero-fields' zero fields: cost of the rest of the block, "
                        "'/zero-fields-detached' also no gradient into the local model: the block's own operations)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=12, help="timed steps per model (interleaved)")
    p.add_argument("--profile-steps", type=int, default=4, help="steps under torch.profiler (0: none)")
    p.add_argument("--kernel-profile", action="store_true",
                   help="compile with Inductor's kernel profile (torch._inductor.config.cpp.enable_kernel_profile), so "
                        "that the profile of a compiled step (--profile-steps) shows its fused kernels; the timed "
                        "steps then run that build too (a record per kernel, checked and skipped when no profiler runs)")
    p.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                   help="set an Inductor option for every compiled step of the run, e.g. max_autotune=True or "
                        "cpp.simdlen=8 (torch._inductor.config; the value read as a Python literal; repeatable)")
    p.add_argument("--field-sum", action="store_true",
                   help="also time the compiled step's open-molecule field sum alone on each set's first batch "
                        "(field_sum_times: eager and compiled, C_lr = 4)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--device", default="cpu",
                   help="cpu or cuda (timed with synchronisation; the ratios then use the wall-time medians, the "
                        "CPU columns count only the host's share); falls back to CPU with a message without CUDA")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mace", action="store_true", help="also time MACE in the peers venv")
    p.add_argument("--out", default=None, help="output stem (default benchmarks/results/train_step)")
    p.add_argument("--compare-ref", default=None, metavar="REV",
                   help="local model only: time this tree's training step against git revision REV's code "
                        "(fused.py, chunked.py, blocks.py, model.py swapped in), same models, interleaved, "
                        "with a profiler breakdown of both (writes <out>, default train_step.local)")
    p.add_argument("--compiled", action="store_true",
                   help="with --compare-ref: also time the compiled training step (train(compile=True); the first "
                        "step compiles, minutes on a CPU)")
    p.add_argument("--mace-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.test_fraction, args.max_frames = 0.2, 0
    args.device = str(harness.resolve_device(args.device))
    if args.device != "cpu" and args.compare_ref:
        p.error("--compare-ref times CPU steps only")
    if args.mace_child:
        return run_mace_child(args)
    if args.compare_ref:
        return compare_local(args)
    torch.set_num_threads(args.threads)
    # every compiled step is a graph of the same function (CompiledLossGradient._loss_and_grad); dynamo's default
    # limit of 8 per function ended a run of two sets x five compiled variants with FailOnRecompileLimitHit
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    _label_lr_fields()
    if args.kernel_profile:
        import torch._inductor.config as inductor_config

        inductor_config.cpp.enable_kernel_profile = True
    for option in args.inductor:
        set_inductor_option(option)
    dtype = getattr(torch, args.dtype)
    rows, field_sums = [], []
    t_start, load_start = time.perf_counter(), round(os.getloadavg()[0], 2)
    for name in args.sets:
        batches, species, stats_graphs = make_batches(name, args)
        atoms = round(sum(int(b.positions.shape[0]) for b in batches) / len(batches), 1)
        if args.field_sum and not bool(batches[0].pbc.any()):
            field_sums.append({"set": name, **field_sum_times(batches[0], dtype)})
            print(json.dumps(field_sums[-1]), flush=True)
        for channels in args.channels:
            kinds = [k if k == "none" or not pl else f"{k}[{pl}]" for k in args.kinds for pl in args.placements]
            kinds = list(dict.fromkeys(kinds))
            models = {k: build_model(k, species, channels, args, stats_graphs) for k in kinds}
            steps, compile_info = {}, {}
            for k in kinds:
                for v in ([v for v in ("", "+compile") if v in args.variants] if k == "none" else args.variants):
                    if v.startswith("+compile"):
                        steps[k + v], compile_s, diff = compiled_step_fn(models[k], batches, dtype,
                                                                         v[len("+compile"):])
                        compile_info[k + v] = {"compile_s": round(compile_s, 1), "compiled_vs_eager": diff}
                        print(k + v, compile_info[k + v], flush=True)
                    else:
                        steps[k + v] = step_fn(models[k], batches, dtype, v)
            times = harness.time_fns(steps, warmup=args.warmup, repeats=args.repeats,
                                     sync=harness.sync_fn(torch.device(args.device)))
            for kind in steps:
                base = times.get("none+compile" if "+compile" in kind else "none")
                t = times[kind]
                row = {"set": name, "channels": channels, "model": kind, "atoms_per_batch": atoms,
                       "median_s": round(t["median"], 5), "iqr_s": round(t["iqr"], 5),
                       "cpu_median_s": round(t["cpu_median"], 5)}
                if base is not None:
                    row["ratio_to_none"] = round(t["median"] / base["median"], 3)
                    row["cpu_ratio_to_none"] = round(t["cpu_median"] / base["cpu_median"], 3)
                    row["lr_overhead_s"] = round(t["median"] - base["median"], 5)
                row.update(compile_info.get(kind, {}))
                if args.profile_steps and (kind in kinds or "+compile" in kind) and args.device == "cpu":
                    row["profile"] = profile_step(steps[kind], args.profile_steps)
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "profile"}), flush=True)
            if args.mace:
                base = times.get("none")  # MACE against the eager short-range step
                m, why = mace_step_time(name, channels, args)
                row = {"set": name, "channels": channels, "model": "mace", "atoms_per_batch": atoms}
                if m is None:
                    row["note"] = why
                else:
                    row.update(median_s=round(m["median_s"], 5), iqr_s=round(m["iqr_s"], 5),
                               cpu_median_s=round(m["cpu_median_s"], 5))
                    if base is not None:
                        row["ratio_to_none"] = round(m["median_s"] / base["median"], 3)
                        row["cpu_ratio_to_none"] = round(m["cpu_median_s"] / base["cpu_median"], 3)
                    for r in rows:
                        if r["set"] == name and r["channels"] == channels and "median_s" in r:
                            r["ratio_to_mace"] = round(r["median_s"] / m["median_s"], 3)
                            r["cpu_ratio_to_mace"] = round(r["cpu_median_s"] / m["cpu_median_s"], 3)
                rows.append(row)
                print(json.dumps(row), flush=True)
    meta = harness.machine_info(torch.device(args.device))  # read at the end: its date and load too
    meta.update(command=harness.command_line("train_step.py"), loadavg_start=load_start,
                loadavg_end=round(os.getloadavg()[0], 2), wall_s=round(time.perf_counter() - t_start, 1),
                settings={k: v for k, v in vars(args).items() if k != "mace_child"})
    if field_sums:
        meta["field_sum"] = field_sums
    meta["settings"]["data_dir"] = str(meta["settings"]["data_dir"])
    harness.write_results("train_step", rows, meta, markdown=_markdown(rows, meta), out=args.out)


def _max_difference(model, batches, modules):
    """max |Δ| of energy and forces between today's and the reference code on the first batch, and of the
    loss gradients (float64 copies of the model)."""
    import copy

    from cartlorem.training.loss import weighted_loss

    m = copy.deepcopy(model).double()
    batch = batches[0].to(dtype=torch.float64)
    res = []
    for ctx in (contextlib.nullcontext(), reference_code(modules)):
        with ctx:
            pred = m(batch, compute_forces=True, compute_stress=False, create_graph=True)
            loss, _ = weighted_loss(pred, batch, {"energy": 10.0, "forces": 1.0, "stress": 0.0})
            grads = torch.autograd.grad(loss, [q for q in m.parameters() if q.requires_grad], allow_unused=True)
        res.append((pred["energy"].detach(), pred["forces"].detach(),
                    torch.cat([g.flatten() for g in grads if g is not None])))
    (e0, f0, g0), (e1, f1, g1) = res
    return {"energy_eV": float((e0 - e1).abs().max()), "forces_eV_per_A": float((f0 - f1).abs().max()),
            "loss_grad_rel": float((g0 - g1).abs().max() / g1.abs().max())}


def compare_local(args):
    """This tree's local training step against revision ``args.compare_ref`` (see --compare-ref)."""
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    modules = load_reference(args.compare_ref)
    ref_rev = subprocess.run(["git", "rev-parse", "--short", args.compare_ref], cwd=harness.REPO_ROOT,
                             capture_output=True, text=True).stdout.strip()
    rows, breakdowns = [], []
    t_start, load_start = time.perf_counter(), round(os.getloadavg()[0], 2)
    for name in args.sets:
        batches, species, stats_graphs = make_batches(name, args)
        atoms = round(sum(int(b.positions.shape[0]) for b in batches) / len(batches), 1)
        edges = round(sum(int(b.edge_index.shape[1]) for b in batches) / len(batches), 1)
        for channels in args.channels:
            model_ref = build_model("none", species, channels, args, stats_graphs)
            model_new = build_model("none", species, channels, args, stats_graphs)
            diff = _max_difference(model_new, batches, modules)
            step_ref = step_fn(model_ref, batches, dtype, reference_loop=True)
            step_new = step_fn(model_new, batches, dtype)
            fns = {"new": step_new}
            if args.compiled:
                model_c = build_model("none", species, channels, args, stats_graphs)
                fns["compiled"], compile_s, diff_c = compiled_step_fn(model_c, batches, dtype)

            def ref_step(step=step_ref):
                with reference_code(modules):
                    step()

            times = harness.time_fns({"ref": ref_step, **fns}, warmup=args.warmup, repeats=args.repeats)
            row = {"set": name, "channels": channels, "atoms_per_batch": atoms, "edges_per_batch": edges,
                   "ref_cpu_median_s": round(times["ref"]["cpu_median"], 5),
                   "new_cpu_median_s": round(times["new"]["cpu_median"], 5),
                   "speedup_cpu": round(times["ref"]["cpu_median"] / times["new"]["cpu_median"], 3),
                   "ref_wall_median_s": round(times["ref"]["median"], 5),
                   "new_wall_median_s": round(times["new"]["median"], 5),
                   "max_diff_float64": diff}
            if args.compiled:
                row.update(compiled_cpu_median_s=round(times["compiled"]["cpu_median"], 5),
                           compiled_wall_median_s=round(times["compiled"]["median"], 5),
                           speedup_compiled_cpu=round(times["ref"]["cpu_median"] / times["compiled"]["cpu_median"], 3),
                           compiled_over_new_cpu=round(times["new"]["cpu_median"] / times["compiled"]["cpu_median"], 3),
                           compile_s=round(compile_s, 1), compiled_vs_eager=diff_c)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.profile_steps:
                ref_blocks = next(mod for today, mod, _ in modules if today.__name__ == "cartlorem.nn.blocks")
                with reference_code(modules):
                    b_ref = local_breakdown(model_ref, batches, dtype, args.profile_steps, blocks=ref_blocks,
                                            reference_loop=True)
                b_new = local_breakdown(model_new, batches, dtype, args.profile_steps)
                breakdowns.append({"set": name, "channels": channels, "ref": b_ref, "new": b_new})
    meta = harness.machine_info()  # read at the end: its date and load too
    meta.update(command=harness.command_line("train_step.py"), reference=ref_rev, loadavg_start=load_start,
                loadavg_end=round(os.getloadavg()[0], 2), wall_s=round(time.perf_counter() - t_start, 1),
                settings={k: v for k, v in vars(args).items() if k != "mace_child"}, breakdowns=breakdowns)
    meta["settings"]["data_dir"] = str(meta["settings"]["data_dir"])
    harness.write_results("train_step.local", rows, meta, markdown=_local_markdown(rows, meta),
                          out=args.out)


def _load_start(meta) -> str:
    """The load average at the start of a run, as its results file has it (files before session 30 read it at the
    end, with the rest of the machine's description)."""
    if "loadavg_start" in meta:
        return f"{meta['loadavg_start']} at start"
    return f"{meta['loadavg_1min']} (read at the end)"


def _local_markdown(rows, meta):
    lines = ["# The local (short-range) training step: this tree against " + f"{meta['reference']}", "",
             f"Command: `{meta['command']}`", "",
             f"Commit {meta['git_commit']} (dirty: {meta['git_dirty']}), {meta['date']}, {meta['cpu_model']}, "
             f"torch {meta['torch']}, {meta['settings']['threads']} thread(s), {meta['settings']['dtype']}, "
             f"batch {meta['settings']['batch_size']} structures, correlation {meta['settings']['correlation']}, "
             f"model `none`. Load average {_load_start(meta)}, {meta['loadavg_end']} at end "
             f"({meta['cpu_count']} cores, shared with other jobs). Both steps run in one process on identical "
             "models, interleaved; 'ref' runs the code of the reference revision (fused.py, chunked.py, blocks.py, "
             "model.py swapped in). Process CPU time medians.", "",
             harness.markdown_table([{**r, "dE": f"{r['max_diff_float64']['energy_eV']:.1e}",
                                      "dF": f"{r['max_diff_float64']['forces_eV_per_A']:.1e}",
                                      "dg": f"{r['max_diff_float64']['loss_grad_rel']:.1e}"} for r in rows],
                                    [("set", "set"), ("C", "channels"), ("atoms/batch", "atoms_per_batch"),
                                     ("edges/batch", "edges_per_batch"), ("ref CPU (s)", "ref_cpu_median_s"),
                                     ("new CPU (s)", "new_cpu_median_s"), ("speed-up", "speedup_cpu"),
                                     ("ref wall (s)", "ref_wall_median_s"), ("new wall (s)", "new_wall_median_s"),
                                     ("max |ΔE| f64 (eV)", "dE"), ("max |ΔF| f64 (eV/Å)", "dF"),
                                     ("loss-grad rel. Δ f64", "dg")]), ""]
    compiled = [r for r in rows if "compiled_cpu_median_s" in r]
    if compiled:
        lines += ["The compiled step (`train(compile=True)`, cartlorem.training.compiled), timed in the same "
                  "interleaved run; its gradient is compared with the eager step's on the first batch in the run's "
                  "dtype (relative to the largest gradient element). Compile: wall time of the first call.", "",
                  harness.markdown_table(
                      [{**r, "dl": f"{r['compiled_vs_eager']['loss_rel']:.1e}",
                        "dgc": f"{r['compiled_vs_eager']['grad_rel']:.1e}"} for r in compiled],
                      [("set", "set"), ("C", "channels"), ("ref CPU (s)", "ref_cpu_median_s"),
                       ("eager CPU (s)", "new_cpu_median_s"), ("compiled CPU (s)", "compiled_cpu_median_s"),
                       ("compiled ÷ ref speed-up", "speedup_compiled_cpu"), ("compiled ÷ eager", "compiled_over_new_cpu"),
                       ("compile (s)", "compile_s"), ("loss rel. Δ", "dl"), ("grad rel. Δ", "dgc")]), ""]
    phases = ("forward", "first backward", "second backward", "optimiser")
    for b in meta["breakdowns"]:
        for which in ("ref", "new"):
            d = b[which]
            lines += [f"## {b['set']}, C = {b['channels']}, {which}: self CPU ms per step by component and phase "
                      f"(torch.profiler, {d['profiled_ms_per_step']} ms profiled; ops per step {d['ops_per_step']})", "",
                      harness.markdown_table(d["rows"] + [{"component": "total", **d["phase_ms"],
                                                           "total_ms": d["profiled_ms_per_step"], "share": 1.0}],
                                             [("component", "component")] + [(p, p) for p in phases]
                                             + [("total", "total_ms"), ("share", "share")]), ""]
    return "\n".join(lines)


def _markdown(rows, meta):
    cols = [("set", "set"), ("C", "channels"), ("model", "model"), ("atoms/batch", "atoms_per_batch"),
            ("step median (s)", "median_s"), ("IQR (s)", "iqr_s"), ("÷ none", "ratio_to_none"),
            ("CPU median (s)", "cpu_median_s"), ("CPU ÷ none", "cpu_ratio_to_none"),
            ("÷ MACE", "ratio_to_mace"), ("CPU ÷ MACE", "cpu_ratio_to_mace"), ("LR fields fwd (s)", "lr_fwd")]
    table = [{**r, "lr_fwd": r.get("profile", {}).get("lr_fields_fwd_s"), "atoms_per_batch": round(r["atoms_per_batch"], 1)}
             for r in rows]
    lines = ["# One training step (energy + forces + loss backward) per long-range kind", "",
             f"Command: `{meta['command']}`", "",
             f"Commit {meta['git_commit']} (dirty: {meta['git_dirty']}), {meta['date']}, {meta['cpu_model']}, "
             f"torch {meta['torch']}, {meta['settings']['threads']} thread(s), {meta['settings']['dtype']}, "
             f"batch {meta['settings']['batch_size']} structures, correlation {meta['settings']['correlation']}. "
             f"Load average {_load_start(meta)}, {meta['loadavg_end']} at end "
             f"({meta['cpu_count']} cores, shared with other jobs: absolute times are pessimistic; the ratios "
             "between cartlorem models are of interleaved steps and hold)."
             + (" MACE is timed in its own process (the peers venv) after the cartlorem steps of the same set and "
                "C, not interleaved with them: its ratios (÷ MACE) carry any change of load between the two."
                if any(r["model"] == "mace" for r in rows) else ""), ""]
    if meta.get("gpu"):
        lines += [f"Device: {meta['gpu']} (CUDA {meta['cuda']}), synchronised before each clock read. On a GPU the "
                  "wall-time columns are the measure (the ÷ columns); the CPU columns count only the host's share "
                  "of the step.", ""]
    lines += [harness.markdown_table(table, cols), ""]
    by = {(r["set"], r["channels"], r["model"]): r for r in rows if "cpu_median_s" in r}
    notes = []
    for (name, c, model), r in by.items():
        compiled = model.endswith("+compile")
        base = by.get((name, c, "none+compile" if compiled else "none"))
        plain = model[: -len("+compile")] if compiled else model
        if plain in ("none", "mace") or base is None or any(c in plain for c in "@+/"):
            continue
        over = r["cpu_median_s"] - base["cpu_median_s"]
        line = f"- {name}, C = {c}, {model}: long-range CPU overhead {over * 1e3:.1f} ms per step"
        ref = by.get((name, c, model + "@ref"))
        if ref is not None:
            line += f" (op-by-op kernels: {(ref['cpu_median_s'] - base['cpu_median_s']) * 1e3:.1f} ms)"
        nof = by.get((name, c, model + "/zero-fields"))
        det = by.get((name, c, model + "/zero-fields-detached"))
        if nof is not None:
            # zero fields (charges x 0) leave the block's other operations and their gradients in place, but their
            # backward passes then carry zeros that the compiled graph still computes: the difference is what the
            # field sum costs in the step, not the field sum alone (--field-sum times that)
            line += f"; zero fields in place of the field sum save {(r['cpu_median_s'] - nof['cpu_median_s']) * 1e3:.1f} ms"
            if det is None:
                line += (f", the block with zero fields (multipole maps, products, MLPs) costs "
                         f"{(nof['cpu_median_s'] - base['cpu_median_s']) * 1e3:.1f} ms")
            else:
                line += (f", the block's gradient into the local features (with placement end: the backward and "
                         f"double backward of the last layer's rank-1/2 outputs) "
                         f"{(nof['cpu_median_s'] - det['cpu_median_s']) * 1e3:.1f} ms, the block's own operations "
                         f"(multipole maps, products, MLPs) {(det['cpu_median_s'] - base['cpu_median_s']) * 1e3:.1f} ms")
        notes.append(line + f"; the local model ({base['model']}) {base['cpu_median_s'] * 1e3:.1f} ms.")
    if notes:
        lines += ["## Where the long-range time goes (process CPU time, medians)", ""] + notes + [""]
    if meta.get("field_sum"):
        lines += ["## The compiled step's field sum alone (`field_sum_times`: electrostatic energy, its force, the "
                  "gradient of energy + Σ force² in the multipoles; first batch of each set, C_lr = 4)", "",
                  harness.markdown_table(meta["field_sum"], [("set", "set"), ("atoms", "atoms"), ("pairs", "pairs"),
                                                             ("eager (ms)", "eager_ms"), ("compiled (ms)", "compiled_ms"),
                                                             ("compile (s)", "compile_s")]), ""]
    profiled = [r for r in rows if r.get("profile", {}).get("breakdown_ms")]
    if profiled:
        table = []
        for r in profiled:
            b = r["profile"]["breakdown_ms"]
            base = by.get((r["set"], r["channels"], "none+compile" if r["model"].endswith("+compile") else "none"))
            base_b = (base or {}).get("profile", {}).get("breakdown_ms")
            row = {"set": r["set"], "C": r["channels"], "model": r["model"], **b,
                   "total": round(sum(b.values()), 3)}
            if base_b and base is not r:
                row["over"] = round(sum(b.values()) - sum(base_b.values()), 3)
            table.append(row)
        lines += ["## The profiled step by kind of work (self CPU ms per step under torch.profiler, "
                  f"{meta['settings']['profile_steps']} steps; `benchmarks/train_step.py: work_kind`)", "",
                  "Profiled times are inflated by the profiler's own cost per op; compare rows, not with the table "
                  "above." + (" Inductor's kernel profile was on (`--kernel-profile`): the fused kernels are their own "
                              "column." if meta["settings"].get("kernel_profile") else " Without `--kernel-profile` the "
                              "fused kernels of a compiled step are inside the graph wrapper's time."), "",
                  harness.markdown_table(table, [("set", "set"), ("C", "C"), ("model", "model")]
                                         + [(k, k) for k in WORK_KINDS]
                                         + [("total", "total"), ("over the local step", "over")]), ""]
    for r in rows:
        if "profile" not in r:
            continue
        lines += [f"## {r['set']}, C = {r['channels']}, {r['model']}: top ops by self CPU time", "",
                  harness.markdown_table(r["profile"]["top_ops"],
                                         [("op", "op"), ("self ms/step", "self_ms_per_step"),
                                          ("share", "share"), ("calls/step", "calls_per_step")]), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
