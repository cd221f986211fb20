"""Alignment time per subject of PAS, DPO and PPO on one model and machine, as ratios.

    python benchmarks/bench_align.py [--dpo-steps 8] [--ppo-steps 2]

PAS runs completely (clean protocol, 4-fold alpha search, activations amortised over 300
subjects). DPO and PPO run a few optimisation steps with the paper's batch sizes (effective 16)
and are extrapolated linearly to the paper's 250 steps (their steps cost the same throughout).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from palign.data import load_papi
from palign.eval.scoring import Scorer, ScoringConfig
from palign.methods.base import MethodContext
from palign.methods.dpo import DPO
from palign.methods.pas import PAS
from palign.methods.ppo import PPO
from palign.models import load_gguf_package

PAPER_STEPS = 250


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dpo-steps", type=int, default=8)
    parser.add_argument("--ppo-steps", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("TRANSFORMERS_SDPA_FORCE_GQA", "1")  # as hardware=cpu
    data = load_papi()
    subject, items = data.subjects[0], data.inventory.train_items
    loaded = load_gguf_package("smollm2_135m")
    scorer = Scorer(loaded, ScoringConfig())

    pas = PAS()
    pas.setup(MethodContext(data, scorer))
    start = time.perf_counter()
    pas.align(subject, items)
    pas_s = time.perf_counter() - start + pas.activation_s / 300

    measured = {}
    for method, steps in (
        (DPO(steps=args.dpo_steps), args.dpo_steps),
        (PPO(steps=args.ppo_steps), args.ppo_steps),
    ):
        method.setup(MethodContext(data, scorer))
        start = time.perf_counter()
        method.align(subject, items)
        seconds = time.perf_counter() - start
        measured[method.name] = (steps, seconds, seconds / steps * PAPER_STEPS)
        method.peft_model.unload()  # unwrap the LoRA layers before the next method wraps its own

    print(
        f"machine: {platform.machine()} x{os.cpu_count()} CPU, torch {torch.__version__}, smollm2_135m, subject {subject.case}"
    )
    print("| method | measured | time per subject (s) | ratio to PAS |")
    print("|---|---|---|---|")
    print(f"| pas (clean, 4 folds x 6 alphas) | full run | {pas_s:.0f} | 1 |")
    for name, (steps, seconds, full) in measured.items():
        print(
            f"| {name} ({PAPER_STEPS} steps, batch 16) | {steps} steps in {seconds:.0f} s, extrapolated | {full:.0f} | {full / pas_s:.1f}x |"
        )


if __name__ == "__main__":
    main()
