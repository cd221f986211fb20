"""Per-head linear probes and mass-mean directions, batched over heads and subjects.

Activations are shared by all subjects (only labels differ), so every head of every subject is
fitted at once: L2-regularised logistic regression (scikit-learn's objective,
``0.5 |w|^2 + C * sum log-loss``, intercept not penalised) solved by batched Newton steps on the
activations' device. Shapes: ``x`` (rows, heads, dim) — rows are contrastive prompts, heads are
all (layer, head) pairs flattened; ``y`` and masks (subjects, rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class ProbeFit:
    """Per subject and head: ``train_acc``, ``val_acc`` (subjects, heads); weights (subjects,
    heads, dim) and ``bias`` (subjects, heads) of the logistic probe."""

    weight: torch.Tensor
    bias: torch.Tensor
    train_acc: torch.Tensor
    val_acc: torch.Tensor


def split_rows(
    item_of_row: np.ndarray, labelled: np.ndarray, train_fraction: float, seeds: list[int]
) -> np.ndarray:
    """Seeded train/validation split per subject, keeping an item's rows on the same side.

    ``item_of_row``: (rows,) item index of each row; ``labelled``: (subjects, rows) bool.
    Returns ``train`` (subjects, rows) bool; validation = labelled & ~train.
    """
    train = np.zeros_like(labelled)
    for s, seed in enumerate(seeds):
        items = np.unique(item_of_row[labelled[s]])
        rng = np.random.default_rng(seed)
        chosen = rng.permutation(items)[: int(round(train_fraction * len(items)))]
        train[s] = labelled[s] & np.isin(item_of_row, chosen)
    return train


def _chunk_size(n_heads: int, rows: int, dim: int, budget_bytes: float) -> int:
    per_subject = n_heads * (rows * (dim + 1) + 2 * (dim + 1) ** 2) * 4
    return max(1, int(budget_bytes // per_subject))


@torch.no_grad()
def fit_probes(
    x: torch.Tensor,
    y: torch.Tensor,
    train: torch.Tensor,
    val: torch.Tensor,
    c: float = 1.0,
    max_iter: int = 25,
    tol: float = 1e-4,
    budget_bytes: float = 1e9,
    dtype: torch.dtype = torch.float32,
) -> ProbeFit:
    """Fit one logistic probe per (subject, head) on the subject's ``train`` rows.

    ``x``: (rows, heads, dim) float; ``y``: (subjects, rows) in {0, 1}; ``train``/``val``:
    (subjects, rows) bool. Subjects are processed in chunks that fit ``budget_bytes``. The
    Hessian is positive definite (L2 term), so each step is a batched Cholesky solve.
    """
    rows, n_heads, dim = x.shape
    xa = torch.cat([x, x.new_ones(rows, n_heads, 1)], -1).transpose(0, 1).to(dtype)  # (H, N, D+1)
    reg = torch.ones(dim + 1, dtype=xa.dtype, device=x.device)
    reg[-1] = 0.0  # the intercept is not penalised
    weights, biases, train_accs, val_accs = [], [], [], []
    step = _chunk_size(n_heads, rows, dim, budget_bytes)
    for start in range(0, y.shape[0], step):
        yc = y[start : start + step].to(xa)
        mc = train[start : start + step].to(xa)
        theta = xa.new_zeros(yc.shape[0], n_heads, dim + 1)
        for _ in range(max_iter):
            z = torch.einsum("hnd,shd->shn", xa, theta)
            p = torch.sigmoid(z)
            grad = (
                c * torch.einsum("hnd,shn->shd", xa, mc[:, None] * (p - yc[:, None])) + reg * theta
            )
            curv = c * mc[:, None] * p * (1 - p)  # (S, H, N)
            hess = torch.matmul((xa[None] * curv[..., None]).transpose(-1, -2), xa[None])
            hess = hess + torch.diag_embed(reg).expand_as(hess)
            delta = torch.cholesky_solve(grad[..., None], torch.linalg.cholesky(hess))[..., 0]
            theta = theta - delta
            if delta.abs().max() < tol:
                break
        pred = (torch.einsum("hnd,shd->shn", xa, theta) > 0).to(xa)
        correct = (pred == yc[:, None]).to(xa)
        vc = val[start : start + step].to(xa)[:, None]
        train_accs.append((correct * mc[:, None]).sum(-1) / mc[:, None].sum(-1).clamp(min=1))
        val_accs.append((correct * vc).sum(-1) / vc.sum(-1).clamp(min=1))
        weights.append(theta[..., :-1])
        biases.append(theta[..., -1])
    return ProbeFit(
        weight=torch.cat(weights).float(),
        bias=torch.cat(biases).float(),
        train_acc=torch.cat(train_accs).float(),
        val_acc=torch.cat(val_accs).float(),
    )


def rank_heads(
    fit: ProbeFit, ranking: str, top_k: int, allowed: torch.Tensor | None = None
) -> torch.Tensor:
    """Indices (subjects, top_k) of the best heads by ``ranking``: ``val`` (validation accuracy)
    or ``mean_train_val`` (mean of train and validation accuracy, as the reference code).
    Ties keep the lower head index. ``allowed``: (heads,) bool restricting the candidates."""
    if ranking == "val":
        score = fit.val_acc
    elif ranking == "mean_train_val":
        score = (fit.train_acc + fit.val_acc) / 2
    else:
        raise ValueError(f"method.ranking={ranking!r} is not 'val' or 'mean_train_val'")
    if allowed is not None:
        score = torch.where(allowed.to(score.device), score, torch.full_like(score, -1.0))
    order = torch.sort(-score, dim=-1, stable=True).indices
    return order[:, :top_k]


@torch.no_grad()
def mass_mean_directions(
    x: torch.Tensor, y: torch.Tensor, labelled: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per subject and head: unit mass-mean shift (mean of label-1 rows - mean of label-0 rows)
    and sigma, the standard deviation of all labelled rows' projections on it.

    ``x``: (rows, heads, dim); ``y``, ``labelled``: (subjects, rows). Returns directions
    (subjects, heads, dim) and sigma (subjects, heads).
    """
    xd = x.double()
    m = labelled.to(xd)
    pos, neg = m * y.to(xd), m * (1 - y.to(xd))
    mean_pos = torch.einsum("sn,nhd->shd", pos, xd) / pos.sum(-1).clamp(min=1)[:, None, None]
    mean_neg = torch.einsum("sn,nhd->shd", neg, xd) / neg.sum(-1).clamp(min=1)[:, None, None]
    diff = mean_pos - mean_neg
    direction = diff / diff.norm(dim=-1, keepdim=True)
    return direction.float(), projection_sigma(xd, direction, m).float()


def projection_sigma(
    x: torch.Tensor, direction: torch.Tensor, labelled: torch.Tensor
) -> torch.Tensor:
    """Std (ddof 0) over labelled rows of ``x`` projected on ``direction`` (subjects, heads, dim)."""
    proj = torch.einsum("nhd,shd->shn", x.to(direction), direction)
    m = labelled.to(proj)[:, None]
    n = m.sum(-1).clamp(min=1)
    mean = (proj * m).sum(-1) / n
    return (((proj - mean[..., None]) ** 2 * m).sum(-1) / n).sqrt()
