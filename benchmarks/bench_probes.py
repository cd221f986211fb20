"""Probe fitting: palign's batched Newton solver vs a loop of scikit-learn fits.

    python benchmarks/bench_probes.py [--subjects 300] [--heads 1024] [--dim 128] [--device cuda]
        [--sklearn-fits 64] [--sklearn-threads 1] [--sklearn-solver lbfgs] [--sklearn-tol 1e-4]
        [--skip-large]

Case 1 (always): SmolLM2-135M's 270 heads (dim 64), one subject, 240 contrastive rows:
batched fit + ranking + mass-mean directions, the fit alone, and 270 scikit-learn
LogisticRegression fits. Case 2: many subjects x many heads of random activations (default: 300
subjects x 1024 heads of dim 128, Llama-3-8B's shape), batched; scikit-learn is timed on
``--sklearn-fits`` (subject, head) problems spread over all of them and extrapolated, or on every
problem with ``--sklearn-fits 0`` (e.g. ``--subjects 8 --sklearn-fits 0`` on CPU: 8192 fits).
scikit-learn's BLAS runs on ``--sklearn-threads`` threads (1: its fastest at these sizes), with
``--sklearn-solver``/``--sklearn-tol`` (default: LogisticRegression's). Each case also prints how
the scikit-learn fits agree with palign's (max |weight difference|, share of equal validation
accuracies); ``--sklearn-solver newton-cholesky --sklearn-tol 1e-8`` gives exact references.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

from palign.pas.probes import fit_probes, mass_mean_directions, rank_heads, split_rows


def synthetic(subjects: int, heads: int, dim: int, device: str, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.normal(size=(240, heads, dim)).astype(np.float32)).to(device)
    answers = rng.choice([1, 2, 3, 4, 5], size=(subjects, 120), p=[0.05, 0.2, 0.3, 0.35, 0.1])
    labelled = np.repeat(answers != 3, 2, axis=1)
    is_a = np.tile([True, False], 120)
    y = (np.where(np.repeat(answers >= 4, 2, axis=1), is_a, ~is_a) & labelled).astype(np.float32)
    train = split_rows(np.repeat(np.arange(120), 2), labelled, 0.6, list(range(subjects)))
    t = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    return x, t(y), t(labelled), t(train), t(labelled & ~train)


def _sync(x: torch.Tensor) -> None:
    if x.is_cuda:
        torch.cuda.synchronize()


def batched(x, y, labelled, train, val, top_k=24, budget=2e9):
    """Seconds for fit + ranking + mass-mean directions, seconds for the fit alone, the fit."""
    start = time.perf_counter()
    fit = fit_probes(x, y, train, val, budget_bytes=budget)
    _sync(x)
    fit_s = time.perf_counter() - start
    rank_heads(fit, "val", top_k)
    mass_mean_directions(x, y, labelled)
    _sync(x)
    return time.perf_counter() - start, fit_s, fit


def sklearn_loop(x, y, train, val, problems, threads: int, solver="lbfgs", tol=1e-4):
    """Seconds for scikit-learn fits of ``problems`` (list of (subject, head)); their weights
    (P, dim) and validation accuracies (P,)."""
    xn, yn = x.cpu().numpy(), y.cpu().numpy()
    tn, vn = train.cpu().numpy(), val.cpu().numpy()
    weights, accs = [], []
    with threadpool_limits(threads):
        start = time.perf_counter()
        for s, h in problems:
            clf = LogisticRegression(C=1.0, max_iter=1000, solver=solver, tol=tol)
            clf.fit(xn[tn[s], h], yn[s, tn[s]])
            weights.append(clf.coef_[0])
            accs.append(clf.score(xn[vn[s], h], yn[s, vn[s]]) if vn[s].any() else 0.0)
        seconds = time.perf_counter() - start
    return seconds, np.array(weights), np.array(accs)


def agreement(fit, problems, weights, accs) -> str:
    s, h = np.array(problems).T
    dw = np.abs(fit.weight[s, h].cpu().numpy() - weights).max()
    same = np.mean(np.abs(fit.val_acc[s, h].cpu().numpy() - accs) < 1e-6)
    return f"max abs dw {dw:.1e}, val acc equal {same:.1%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=300)
    parser.add_argument("--heads", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sklearn-fits", type=int, default=64, help="0: every problem")
    parser.add_argument("--sklearn-threads", type=int, default=1)
    parser.add_argument("--sklearn-solver", default="lbfgs")
    parser.add_argument("--sklearn-tol", type=float, default=1e-4)
    parser.add_argument("--skip-large", action="store_true")
    args = parser.parse_args()
    name = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"{platform.machine()} CPU x{os.cpu_count()}, torch threads {torch.get_num_threads()}"
    )
    print(f"device: {name}, torch {torch.__version__}")
    print(
        "| case | batched (s) | fit only (s) | scikit-learn loop (s) | speed-up (fit) | agreement |"
    )
    print("|---|---|---|---|---|---|")
    sk = (args.sklearn_threads, args.sklearn_solver, args.sklearn_tol)
    data = synthetic(1, 270, 64, args.device)
    batched(*data)  # warm-up
    fast, fit_s, fit = batched(*data)
    problems = [(0, h) for h in range(270)]
    slow, w, acc = sklearn_loop(data[0], data[1], data[3], data[4], problems, *sk)
    print(
        f"| 1 subject x 270 heads x 64 (smollm2_135m) | {fast:.3f} | {fit_s:.3f} | {slow:.2f} "
        f"| {slow / fit_s:.1f}x | {agreement(fit, problems, w, acc)} |"
    )
    if args.skip_large:
        return
    data = synthetic(args.subjects, args.heads, args.dim, args.device)
    fast, fit_s, fit = batched(*data)
    total = args.subjects * args.heads
    count = total if args.sklearn_fits <= 0 else min(args.sklearn_fits, total)
    picks = np.random.default_rng(0).permutation(total)[:count] if count < total else range(total)
    problems = [divmod(int(p), args.heads) for p in picks]
    slow, w, acc = sklearn_loop(data[0], data[1], data[3], data[4], problems, *sk)
    slow *= total / count
    how = "" if count == total else f" (extrapolated from {count} fits)"
    print(
        f"| {args.subjects} subjects x {args.heads} heads x {args.dim} | {fast:.1f} | {fit_s:.1f} "
        f"| {slow:.1f}{how} | {slow / fit_s:.1f}x | {agreement(fit, problems, w, acc)} |"
    )


if __name__ == "__main__":
    main()
