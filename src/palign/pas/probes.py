"""Per-head linear probes and mass-mean directions, batched over heads and subjects.

Activations are shared by all subjects (only labels differ), so every head of every subject is
one small L2-regularised logistic regression (scikit-learn's objective,
``0.5 |w|^2 + C * sum log-loss``, intercept not penalised) on the subject's train rows, and all
of them are solved together by batched, damped Newton steps on the activations' device. With
fewer train rows than dims each step is solved in the span of the rows (an (n, n) system, not
(dim + 1, dim + 1)). On CPU, chunks of problems run on single-threaded worker threads. Shapes:
``x`` (rows, heads, dim) — rows are contrastive prompts, heads are all (layer, head) pairs
flattened; ``y`` and masks (subjects, rows). Each Newton step is a safe point of the stop
policy (:mod:`palign.stopping`).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from palign import stopping


@dataclass
class ProbeFit:
    """Per subject and head: ``train_acc``, ``val_acc`` (subjects, heads); weights (subjects,
    heads, dim) and ``bias`` (subjects, heads) of the logistic probe."""

    weight: torch.Tensor
    bias: torch.Tensor
    train_acc: torch.Tensor
    val_acc: torch.Tensor


SPLITS = ("item", "row")


def split_rows(
    item_of_row: np.ndarray,
    labelled: np.ndarray,
    train_fraction: float,
    seeds: list[int],
    by: str = "item",
) -> np.ndarray:
    """Seeded train/validation split of each subject's labelled rows.

    ``item_of_row``: (rows,) item index of each row; ``labelled``: (subjects, rows) bool.
    ``by="item"`` keeps an item's rows (its "A" and "E" prompts) on the same side, a fraction
    ``train_fraction`` of the items (rounded) in train; ``by="row"`` draws ``int(train_fraction
    * rows)`` of the labelled rows, as the reference code (an item's two rows can then fall on
    both sides, so validation sees the train items' mirror images). Returns ``train``
    (subjects, rows) bool; validation = labelled & ~train.
    """
    if by not in SPLITS:
        raise ValueError(f"split by {by!r} is not one of {SPLITS}")
    train = np.zeros_like(labelled)
    for s, seed in enumerate(seeds):
        rng = np.random.default_rng(seed)
        if by == "row":
            rows = np.flatnonzero(labelled[s])
            train[s, rng.permutation(rows)[: int(train_fraction * len(rows))]] = True
            continue
        items = np.unique(item_of_row[labelled[s]])
        chosen = rng.permutation(items)[: int(round(train_fraction * len(items)))]
        train[s] = labelled[s] & np.isin(item_of_row, chosen)
    return train


SOLVERS = ("auto", "rows", "primal")


def _spd_solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Solve ``a x = b`` for a batch of SPD ``a`` (P, k, k) and ``b`` (P, k, r) by Cholesky."""
    return torch.cholesky_solve(b, torch.linalg.cholesky_ex(a)[0])


def _objective(z, y, m, c, ww):
    """``0.5 |w|^2 + c * sum of masked log-losses`` per problem; ``z``, ``y``, ``m`` (P, n)."""
    return 0.5 * ww + c * (m * (torch.nn.functional.softplus(z) - y * z)).sum(-1)


def _rows_direction(k, theta, z, r, q, c):
    """Newton direction in the span of the train rows (``w = X^T alpha``), for ``n < dim``.

    ``k``: (P, n, n) Gram matrices ``X X^T``; ``theta``: (P, n + 1) ``[alpha, b]``; ``z`` (P, n)
    logits; ``r = m (p - y)``, ``q = c m p (1 - p)`` (P, n). The primal Hessian
    ``[[I + X^T Q X, X^T q], [q^T X, sum q]]`` is inverted by Woodbury with the SPD (n, n) matrix
    ``I + S K S`` (``S = sqrt(Q)``, eigenvalues >= 1) and a Schur complement for the intercept.
    Returns the step (P, n + 1), its change of the logits (P, n) and ``w.w``, ``w.dw``,
    ``dw.dw`` (P,) for the line search.
    """
    alpha, b = theta[:, :-1], theta[:, -1]
    s = q.sqrt()
    m = (k * s[:, None, :]).mul_(s[:, :, None])
    m.diagonal(dim1=-2, dim2=-1).add_(1.0)  # I + S K S
    v = torch.stack([alpha + c * r, q], -1)  # gradient in w (as X^T v0) and X^T Q 1 (as X^T v1)
    kv = torch.bmm(k, v)
    u = v - s[..., None] * _spd_solve(m, s[..., None] * kv)  # A^-1 X^T v = X^T u
    kq = kv[..., 1]
    schur = q.sum(-1) - (kq * u[..., 1]).sum(-1)
    num = c * r.sum(-1) - (kq * u[..., 0]).sum(-1)
    db = torch.where(schur > 0, num / schur.clamp(min=torch.finfo(k.dtype).tiny), 0.0)
    da = u[..., 0] - db[:, None] * u[..., 1]
    kda = torch.bmm(k, da[..., None])[..., 0]
    ka = z - b[:, None]
    step = torch.cat([da, db[:, None]], -1)
    return step, kda + db[:, None], (alpha * ka).sum(-1), (da * ka).sum(-1), (da * kda).sum(-1)


def _primal_direction(f, theta, z, r, q, c):
    """Newton direction in the (dim + 1) weight space, for ``n >= dim``.

    ``f``: (P, n, dim + 1) train rows with a trailing column of ones; ``theta``: (P, dim + 1);
    other arguments and the returns as :func:`_rows_direction`.
    """
    reg = torch.ones(f.shape[-1], dtype=f.dtype, device=f.device)
    reg[-1] = 0.0  # the intercept is not penalised
    hess = torch.bmm(f.transpose(-1, -2), q[..., None] * f)
    hess.diagonal(dim1=-2, dim2=-1).add_(reg)
    hess[:, -1, -1] += (q.sum(-1) == 0).to(f.dtype)  # no curvature at all: keep b, no NaN
    grad = reg * theta + c * torch.bmm(r[:, None], f)[:, 0]
    step = _spd_solve(hess, grad[..., None])[..., 0]
    dz = torch.bmm(f, step[..., None])[..., 0]
    rt = reg * theta
    return step, dz, (theta * rt).sum(-1), (step * rt).sum(-1), (step * reg * step).sum(-1)


def _newton(direction, data, m, y, c, max_iter, tol, width):
    """Damped Newton over a batch of P independent logistic problems (one per subject x head).

    ``data``: per-problem tensor passed to ``direction`` (P, n, ...); ``m``, ``y``: (P, n) train
    mask and labels; ``width``: parameters per problem. Each step halves until the objective does
    not increase (at most 8 times); a problem stops when its full Newton step has
    ``max(|dw|_2, |db|) < tol * max(1, |w|_2, |b|)`` (the step is still taken) and is dropped
    from later steps. Returns ``theta`` (P, size).
    """
    n_problems = m.shape[0]
    theta = m.new_zeros(n_problems, width)
    out = theta.clone()
    live = torch.arange(n_problems, device=m.device)
    z = torch.zeros_like(m)
    slack = 64 * torch.finfo(m.dtype).eps
    for _ in range(max_iter):
        stopping.check()
        p = torch.sigmoid(z)
        step, dz, ww, wd, dd = direction(data, theta, z, m * (p - y), c * m * p * (1 - p), c)
        f0 = _objective(z, y, m, c, ww)
        t = torch.ones_like(f0)
        for _ in range(8):
            ft = _objective(z - t[:, None] * dz, y, m, c, ww - 2 * t * wd + t * t * dd)
            worse = ft > f0 + slack * (1 + f0.abs())
            if not worse.any():
                break
            t = torch.where(worse, t / 2, t)
        theta = theta - t[:, None] * step
        z = z - t[:, None] * dz
        size = torch.maximum(dd.clamp(min=0).sqrt(), step[:, -1].abs())
        scale = torch.maximum(ww.clamp(min=1).sqrt(), theta[:, -1].abs())
        done = size < tol * scale
        if done.all():
            break
        if done.any():
            out[live[done]] = theta[done]
            keep = ~done
            live, theta, z, data, m, y = (a[keep] for a in (live, theta, z, data, m, y))
    out[live] = theta
    return out


def _fit_chunk(x, order, mask, labels, heads, problems, c, max_iter, tol, dtype, solver):
    """Weights (P, dim) and biases (P,) of the flat problems ``problems`` (P,) = subject * heads +
    head; ``order``/``mask``/``labels`` (subjects, n): each subject's train rows first."""
    subject, head = problems // heads, problems % heads
    xs = x[order[subject], head[:, None]].to(dtype)  # (P, n, dim): the problem's train rows
    m, yy = mask[subject], labels[subject]
    n, dim = xs.shape[1:]
    if solver == "rows":
        gram = torch.bmm(xs, xs.transpose(1, 2))
        theta = _newton(_rows_direction, gram, m, yy, c, max_iter, tol, n + 1)
        return torch.bmm(theta[:, None, :-1], xs)[:, 0], theta[:, -1]
    feats = torch.cat([xs, xs.new_ones(*xs.shape[:-1], 1)], -1)
    theta = _newton(_primal_direction, feats, m, yy, c, max_iter, tol, dim + 1)
    return theta[:, :-1], theta[:, -1]


def _on_one_thread() -> None:
    torch.set_num_threads(1)


@torch.no_grad()
def fit_probes(
    x: torch.Tensor,
    y: torch.Tensor,
    train: torch.Tensor,
    val: torch.Tensor,
    c: float = 1.0,
    max_iter: int = 50,
    tol: float = 1e-4,
    budget_bytes: float = 1e9,
    dtype: torch.dtype = torch.float32,
    solver: str = "auto",
    workers: int | None = None,
) -> ProbeFit:
    """Fit one logistic probe per (subject, head) on the subject's ``train`` rows.

    ``x``: (rows, heads, dim) float; ``y``: (subjects, rows) in {0, 1}; ``train``/``val``:
    (subjects, rows) bool. Every (subject, head) is one problem on the subject's train rows
    only (padded to the largest train set, n rows, with masked rows); problems are solved
    together in chunks of at most ``budget_bytes`` by damped Newton steps in ``dtype``, each
    problem stopping once its step is < ``tol`` x max(1, |w|, |b|) (or after ``max_iter``
    steps; ~7 on random data). ``solver``: ``rows`` solves each step in the
    span of the train rows (Woodbury, an (n, n) Cholesky), ``primal`` in the (dim + 1) weights;
    ``auto`` takes ``rows`` when n <= dim + 1. ``workers``: threads that each solve whole
    chunks with single-threaded torch ops; default ``torch.get_num_threads()`` on CPU (small
    batched LAPACK calls gain nothing from intra-op threads), 0 on GPU: one batched loop on the
    caller's thread. A subject with no train rows gets zero weights and bias.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver={solver!r} is not one of {SOLVERS}")
    _, n_heads, dim = x.shape
    n_subjects = y.shape[0]
    train = train.to(x.device, torch.bool)
    n = max(1, int(train.sum(-1).max()))
    if solver == "auto":
        solver = "rows" if n <= dim + 1 else "primal"
    if workers is None:
        workers = torch.get_num_threads() if x.device.type == "cpu" else 0
    order = torch.sort((~train).to(torch.uint8), dim=-1, stable=True).indices[:, :n]  # (S, n)
    mask = torch.gather(train, 1, order).to(dtype)
    labels = torch.gather(y.to(x.device, dtype), 1, order)
    width = n if solver == "rows" else dim + 1
    per_problem = (n * (dim + 1) + 4 * width * width + 16 * n) * torch.finfo(dtype).bits // 8
    total = n_subjects * n_heads
    size = max(1, int(budget_bytes // per_problem) // max(1, workers))
    size = min(size, -(-total // max(1, workers)))  # at least one chunk per worker
    problems = torch.arange(total, device=x.device).split(size)
    args = (x, order, mask, labels, n_heads)
    fit = lambda p: _fit_chunk(*args, p, c, max_iter, tol, dtype, solver)  # noqa: E731
    if workers > 0:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(workers, initializer=_on_one_thread) as pool:
                parts = list(pool.map(fit, problems))
        finally:
            torch.set_num_threads(threads)
    else:
        parts = [fit(p) for p in problems]
    weight = torch.cat([w for w, _ in parts]).float().reshape(n_subjects, n_heads, dim)
    bias = torch.cat([b for _, b in parts]).float().reshape(n_subjects, n_heads)
    pred = torch.einsum("nhd,shd->shn", x.float(), weight) + bias[..., None] > 0
    correct = (pred == (y.to(x.device, torch.float32)[:, None] > 0.5)).float()
    mc = train.float()[:, None]
    vc = val.to(x.device).float()[:, None]
    return ProbeFit(
        weight=weight,
        bias=bias,
        train_acc=(correct * mc).sum(-1) / mc.sum(-1).clamp(min=1),
        val_acc=(correct * vc).sum(-1) / vc.sum(-1).clamp(min=1),
    )


TIES = ("first", "last")


def rank_heads(
    fit: ProbeFit,
    ranking: str,
    top_k: int,
    allowed: torch.Tensor | None = None,
    ties: str = "first",
) -> torch.Tensor:
    """Indices (subjects, top_k) of the best heads by ``ranking``: ``val`` (validation accuracy)
    or ``mean_train_val`` (mean of train and validation accuracy, as the reference code).
    Equal scores (exact: the accuracies are counts over the same rows) go to the lower head
    index first (``ties="first"``) or the higher (``"last"``: the reference code's order, a
    descending rank read from an ascending sort reversed). ``allowed``: (heads,) bool
    restricting the candidates."""
    if ties not in TIES:
        raise ValueError(f"ties={ties!r} is not one of {TIES}")
    if ranking == "val":
        score = fit.val_acc
    elif ranking == "mean_train_val":
        score = (fit.train_acc + fit.val_acc) / 2
    else:
        raise ValueError(f"method.ranking={ranking!r} is not 'val' or 'mean_train_val'")
    if allowed is not None:
        score = torch.where(allowed.to(score.device), score, torch.full_like(score, -1.0))
    if ties == "last":
        flipped = torch.sort(-score.flip(-1), dim=-1, stable=True).indices
        return (score.shape[-1] - 1 - flipped)[:, :top_k]
    return torch.sort(-score, dim=-1, stable=True).indices[:, :top_k]


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
