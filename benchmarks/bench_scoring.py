"""Logit-scoring throughput on the embedded model, with and without the shared-prefix KV cache.

    python benchmarks/bench_scoring.py [--items 180] [--plain-items 32] [--batch-size 16]

Measures, on one subject of the real PAPI data:
- items/s of prefix-cached batched logit scoring (palign's Scorer) under the neutral and the
  few-shot (~1.4k-token) system prompt;
- items/s of plain batched forwards of the full prompts (left-padded, no cache) for comparison;
- the per-subject time of few_shot (all 180 test items).
Prints a markdown table; numbers depend on the machine (report it beside them).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from palign.data import load_papi
from palign.eval.prompts import NEUTRAL_SYSTEM_PROMPT, few_shot_system_prompt
from palign.eval.scoring import Scorer, ScoringConfig, letter_token_ids
from palign.models import load_gguf_package


def plain_batched(scorer: Scorer, system: str, items, batch_size: int) -> float:
    """Seconds to score ``items`` by full-prompt forwards (left-padded batches, no KV reuse)."""
    model, tok = scorer.loaded.model, scorer.loaded.tokenizer
    letters = letter_token_ids(scorer.renderer, scorer.config.answer_prefix)
    ids = scorer.encode_prompts(system, items)
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(ids), batch_size):
            chunk = ids[i : i + batch_size]
            width = max(map(len, chunk))
            x = torch.full((len(chunk), width), tok.pad_token_id)
            mask = torch.zeros_like(x)
            for r, seq in enumerate(chunk):
                x[r, width - len(seq) :] = torch.tensor(seq)
                mask[r, width - len(seq) :] = 1
            logits = model(input_ids=x, attention_mask=mask, logits_to_keep=1).logits[:, -1]
            torch.log_softmax(logits.float(), -1)[:, letters]
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=180)
    parser.add_argument("--plain-items", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--gqa", choices=["0", "1"], default="1", help="TRANSFORMERS_SDPA_FORCE_GQA"
    )
    args = parser.parse_args()
    os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] = args.gqa

    data = load_papi()
    inv, subject = data.inventory, data.subjects[0]
    loaded = load_gguf_package("smollm2_135m")
    scorer = Scorer(
        loaded,
        ScoringConfig(batch_size=args.batch_size),
    )
    few_shot = few_shot_system_prompt(inv.train_items, subject.answers(inv.train))
    items = inv.test_items[: args.items]
    scorer.score(NEUTRAL_SYSTEM_PROMPT, items[:4])  # warm-up

    rows = []
    for label, system in (("neutral", NEUTRAL_SYSTEM_PROMPT), ("few-shot", few_shot)):
        n_tokens = len(scorer.encode_prompts(system, items[:1])[0])
        start = time.perf_counter()
        scorer.score(system, items)
        cached = time.perf_counter() - start
        plain_items = items[: args.plain_items]
        plain = plain_batched(scorer, system, plain_items, args.batch_size)
        rows.append((label, n_tokens, len(items) / cached, len(plain_items) / plain, cached))

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, batch {args.batch_size}, GQA in SDPA {args.gqa}"
    )
    print(
        "| system prompt | prompt tokens | cached items/s | plain items/s | speed-up | 180-item subject (s) |"
    )
    print("|---|---|---|---|---|---|")
    for label, n_tokens, fast, slow, seconds in rows:
        per_subject = seconds * 180 / len(items)
        print(
            f"| {label} | {n_tokens} | {fast:.2f} | {slow:.2f} | {fast / slow:.1f}x | {per_subject:.1f} |"
        )


if __name__ == "__main__":
    main()
