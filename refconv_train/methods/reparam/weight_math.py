"""The math of the weight re-parameterizations CWN and OWN as pure functions of tensors (WN is torch's own).

A conv weight of shape ``(C_out, C_in/g, kh, kw)`` is read as a matrix of ``C_out`` rows (filters) of
``fan_in = C_in/g * kh * kw`` values. Everything here works in the weight's dtype; callers turn autocast off.
"""

from __future__ import annotations

import torch


def centred_rows(v: torch.Tensor) -> torch.Tensor:
    """``V - mean_filter(V)``: every output filter minus its own mean, shape ``(C_out, fan_in)``."""
    rows = v.reshape(v.shape[0], -1)
    return rows - rows.mean(dim=1, keepdim=True)


def centred_norm(v: torch.Tensor, eps: float) -> torch.Tensor:
    """``sqrt(||V_o - mean(V_o)||^2 + eps)`` per output filter ``o``, shape ``(C_out, 1, ..., 1)`` like ``V``."""
    c = centred_rows(v)
    return torch.sqrt((c * c).sum(dim=1) + eps).reshape(-1, *[1] * (v.dim() - 1))


def centred_weight_norm(g: torch.Tensor, v: torch.Tensor, eps: float) -> torch.Tensor:
    """CWN (Huang et al., ICCV 2017): ``W_o = g_o * c_o / sqrt(||c_o||^2 + eps)``, ``c_o = V_o - mean(V_o)``.

    Written as ``c * (g / norm)`` so that ``g = centred_norm(V, eps)`` (the init) gives a factor of exactly 1.0 and
    ``W`` equals the centred ``V`` bit for bit: the start is exactly the projection onto zero-mean filters.
    """
    return centred_rows(v).reshape(v.shape) * (g / centred_norm(v, eps))


def own_group_sizes(rows: int, fan_in: int, group: int = 0) -> list[int]:
    """Sizes of OWN's groups of consecutive rows: as equal as possible (they differ by at most one), none larger than
    ``group`` (0 = the maximum) and never larger than ``fan_in - 1``: centred rows lie in the ``fan_in - 1``
    dimensional subspace orthogonal to the all-ones vector, so at most ``fan_in - 1`` of them can be orthonormal
    (a group of ``fan_in`` centred rows has a singular ``V_c V_c^T``). Balanced groups avoid a lone remainder row,
    which OWN would only normalize."""
    cap = max(fan_in - 1, 1) if group <= 0 else min(group, max(fan_in - 1, 1))
    n_groups = -(-rows // cap)
    base, extra = divmod(rows, n_groups)
    return [base + 1] * extra + [base] * (n_groups - extra)


class _InvSqrtPSD(torch.autograd.Function):
    """``A^(-1/2)`` of a batch of symmetric positive semi-definite matrices via ``torch.linalg.eigh``.

    Forward: ``A = U diag(lam) U^T``, ``A^(-1/2) = U diag(1/s) U^T`` with ``s = sqrt(max(lam, floor))`` (the floor
    only absorbs eigh's rounding below the regularizer the caller added). Backward: the Daleckii-Krein formula
    ``dA = U (K o (U^T dY U)) U^T`` whose Loewner matrix has the closed form
    ``K_ij = (1/s_i - 1/s_j) / (s_i^2 - s_j^2) = -1 / (s_i s_j (s_i + s_j))``: no ``1 / (lam_i - lam_j)`` as in
    eigh's own backward, so (near-)degenerate eigenvalues give finite, exact gradients.
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
        lam, u = torch.linalg.eigh(a)
        s = torch.sqrt(torch.maximum(lam, floor))
        ctx.save_for_backward(u, s)
        return (u / s.unsqueeze(-2)) @ u.transpose(-1, -2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        u, s = ctx.saved_tensors
        ut = u.transpose(-1, -2)
        si, sj = s.unsqueeze(-1), s.unsqueeze(-2)
        inner = ut @ (0.5 * (grad + grad.transpose(-1, -2))) @ u
        return u @ (inner * (-1.0 / (si * sj * (si + sj)))) @ ut, None


def inv_sqrt_psd(a: torch.Tensor, floor: torch.Tensor | float = 0.0) -> torch.Tensor:
    """``A^(-1/2)`` for symmetric PSD ``A`` (batched ``(..., n, n)``), eigenvalues floored at ``floor`` (> 0; a
    tensor of shape ``(..., 1)`` gives each matrix its own)."""
    return _InvSqrtPSD.apply(a, torch.as_tensor(floor, dtype=a.dtype, device=a.device))


def orthogonal_weight_norm(v: torch.Tensor, group: int = 0, eps: float = 1e-5) -> torch.Tensor:
    """OWN (Huang et al., AAAI 2018): per group of consecutive rows ``Z`` (sizes :func:`own_group_sizes`), centre
    each row, ``Z_c = Z - mean_row(Z)``, and whiten: ``W = (Z_c Z_c^T + delta I)^(-1/2) Z_c``: rows zero-mean and
    orthonormal.

    ``delta = eps * trace(Z_c Z_c^T) / rows``: ``eps`` relative to the mean eigenvalue, so OWN stays invariant to the
    scale of ``V`` as the math without regularizer is (the authors' code adds a fixed ``1e-8`` to ``Z_c Z_c^T /
    fan_in``). It bounds the whitening gain at ``1 / sqrt(delta)`` for directions ``V`` hardly spans. Conv groups are
    ignored, as in the authors' code: every filter is a vector of the same ``R^fan_in`` (for a depthwise 3x3 conv,
    groups of 8 channels' zero-mean spatial kernels become an orthonormal basis).
    """
    rows, fan_in = v.shape[0], v[0].numel()
    z = v.reshape(rows, fan_in)
    sizes = own_group_sizes(rows, fan_in, group)
    out, start = [], 0
    for size in sorted(set(sizes), reverse=True):  # one batched eigh per group size (at most two sizes)
        count = sizes.count(size)
        zg = z[start:start + size * count].reshape(count, size, fan_in)
        zc = zg - zg.mean(dim=2, keepdim=True)
        cov = zc @ zc.transpose(1, 2)
        # + eps(dtype)^2: an all-zero group (dead filters) stays finite, forward and backward
        delta = eps * cov.diagonal(dim1=1, dim2=2).sum(dim=1) / size + torch.finfo(v.dtype).eps ** 2
        eye = torch.eye(size, dtype=v.dtype, device=v.device)
        whiten = inv_sqrt_psd(cov + delta[:, None, None] * eye, 0.5 * delta.detach()[:, None])
        out.append((whiten @ zc).reshape(size * count, fan_in))
        start += size * count
    return torch.cat(out).reshape(v.shape)
