"""Helpers shared by the Ewald, PME and slab tests (float64 random sources, errors, fields by autograd)."""

import torch

DT = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


def random_traceless(g, *shape):
    """Random symmetric traceless 3×3 tensors [*shape, 3, 3] (float64)."""
    a = torch.randn(*shape, 3, 3, generator=g, dtype=DT)
    a = a + a.transpose(-1, -2)
    return a - a.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None] * torch.eye(3, dtype=DT) / 3


def rel(a, b):
    """Relative error |a − b| / |b| (Frobenius norms)."""
    return float((a - b).detach().norm() / b.detach().norm())


def fields_by_autograd(phi_fn, points):
    """phi, E = -grad phi, G = grad E at every point, by autograd of a scalar potential phi_fn(r)."""
    phis, Es, Gs = [], [], []
    for p in points:
        r = p.clone().requires_grad_(True)
        phi = phi_fn(r)
        (grad,) = torch.autograd.grad(phi, r, create_graph=True)
        hess = torch.stack([torch.autograd.grad(grad[a], r, retain_graph=True)[0] for a in range(3)])
        phis.append(phi.detach())
        Es.append(-grad.detach())
        Gs.append(-hess.detach())
    return torch.stack(phis), torch.stack(Es), torch.stack(Gs)
