"""Probe fitting: palign's batched Newton solver vs a loop of scikit-learn fits.

    python benchmarks/bench_probes.py [--subjects 300] [--heads 1024] [--dim 128] [--device cuda]

Case 1 (always): SmolLM2-135M's 270 heads (dim 64), one subject, 240 contrastive rows:
batched fit + ranking + mass-mean directions vs 270 scikit-learn LogisticRegression fits.
Case 2: many subjects x many heads of random activations (default: 300 subjects x 1024 heads of
dim 128, Llama-3-8B's shape), batched; the scikit-learn time is extrapolated from 64 fits.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

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


def batched(x, y, labelled, train, val, top_k=24, budget=2e9) -> float:
    start = time.perf_counter()
    fit = fit_probes(x, y, train, val, budget_bytes=budget)
    rank_heads(fit, "val", top_k)
    mass_mean_directions(x, y, labelled)
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def sklearn_loop(x, y, train, heads: int) -> float:
    xn, yn, tn = x.cpu().numpy(), y[0].cpu().numpy(), train[0].cpu().numpy()
    start = time.perf_counter()
    for h in range(heads):
        LogisticRegression(C=1.0, max_iter=1000).fit(xn[tn, h], yn[tn])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=300)
    parser.add_argument("--heads", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip-large", action="store_true")
    args = parser.parse_args()
    name = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"{platform.machine()} CPU x{os.cpu_count()}"
    )
    print(f"device: {name}, torch {torch.__version__}")
    print("| case | batched (s) | scikit-learn loop (s) | speed-up |")
    print("|---|---|---|---|")
    data = synthetic(1, 270, 64, args.device)
    batched(*data)  # warm-up
    fast = batched(*data)
    slow = sklearn_loop(data[0], data[1], data[3], 270)
    print(
        f"| 1 subject x 270 heads x 64 (smollm2_135m) | {fast:.3f} | {slow:.2f} | {slow / fast:.0f}x |"
    )
    if args.skip_large:
        return
    data = synthetic(args.subjects, args.heads, args.dim, args.device)
    fast = batched(*data)
    sample = 64
    slow = sklearn_loop(data[0], data[1], data[3], sample) * args.subjects * args.heads / sample
    print(
        f"| {args.subjects} subjects x {args.heads} heads x {args.dim} | {fast:.1f} | {slow:.0f} (extrapolated) | {slow / fast:.0f}x |"
    )


if __name__ == "__main__":
    main()
