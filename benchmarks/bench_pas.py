"""PAS time per subject on the embedded model, split into its parts.

    python benchmarks/bench_pas.py [--subjects 2] [--folds 4]

Runs method=pas (protocol=clean: 4-fold alpha search over 0, 1, 2, 4, 6, 8) on the first
subjects with a fresh activation cache, and prints: activations (once per model, amortised over
subjects in a real run), probes (all fits of a subject: one per fold plus the final one), alpha
search (scoring the held-out items under every alpha) and evaluation (the 180 test items).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import numpy as np
import torch

from palign.data import load_papi
from palign.eval.scoring import Scorer, ScoringConfig
from palign.methods.base import MethodContext
from palign.methods.pas import PAS
from palign.models import load_gguf_package


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=2)
    parser.add_argument("--folds", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    os.environ.setdefault("TRANSFORMERS_SDPA_FORCE_GQA", "1")  # as hardware=cpu
    data = load_papi()
    loaded = load_gguf_package("smollm2_135m")
    scorer = Scorer(
        loaded,
        ScoringConfig(batch_size=args.batch_size),
    )
    method = PAS(folds=args.folds)
    with tempfile.TemporaryDirectory() as cache:
        os.environ["PALIGN_CACHE"] = (
            cache  # fresh activation cache (the model itself is loaded above)
        )
        method.setup(MethodContext(data, scorer))
    rows = []
    for subject in data.subjects[: args.subjects]:
        start = time.perf_counter()
        artifact = method.align(subject, data.inventory.train_items)
        mid = time.perf_counter()
        method.answer(subject, artifact, data.inventory.test_items)
        rows.append(
            (
                artifact.meta["timing"]["probes_s"],
                artifact.meta["timing"]["alpha_search_s"],
                time.perf_counter() - mid,
                mid - start,
            )
        )
    probes, search, evaluation, align = np.mean(rows, axis=0)
    print(
        f"machine: {platform.machine()} x{os.cpu_count()} CPU, torch {torch.__version__}, smollm2_135m, "
        f"{args.subjects} subjects, {args.folds} folds, alphas {method.alphas}"
    )
    print("| part | seconds |")
    print("|---|---|")
    print(f"| activations (once per model; 240 prompts) | {method.activation_s:.1f} |")
    print(f"| probes per subject ({args.folds + 1} fits of 270 heads) | {probes:.2f} |")
    print(
        f"| alpha search per subject ({len(method.alphas)} alphas x 120 held-out items) | {search:.1f} |"
    )
    print(f"| evaluation per subject (180 test items) | {evaluation:.1f} |")
    print(
        f"| total per subject, activations amortised over 300 subjects | {align + evaluation + method.activation_s / 300:.1f} |"
    )


if __name__ == "__main__":
    main()
