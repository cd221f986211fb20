"""Greedy generation speed of the scorer on the embedded model (tokens/s, forwards, FLOP/s).

    python benchmarks/bench_generation.py [--case paper|long|both] [--reps 2] [--threads N]
        [--compare OTHER_SRC] [--batch-size 16] [--long-items 32] [--long-tokens 150] [--json F]

Two cases, both after the few-shot system prompt of subject 1 (its 120 alignment answers, the
stored coding: the ~1.4k-token prefix that protocol=paper caches), on SmolLM2-135M:

- ``paper``: few_shot under protocol=paper, one subject: 180 test items, greedy replies of up
  to 15 tokens after the prefill "Option", ending at EOS (what
  ``python -m palign model=smollm2_135m method=few_shot protocol=paper dataset.limit=1`` scores);
- ``long``: ``--long-items`` items with replies of exactly ``--long-tokens`` tokens (EOS is
  ignored, so every row decodes every step: the open-ended evaluation's reply length).

For each: wall and CPU seconds of ``Scorer.score`` (the CPU time of the process, all its
threads: with ``--threads 1`` it is the work done, little changed by other jobs on a shared
machine; the 1-minute load average is shown beside it), generated tokens per second and per CPU
second, forward calls, tokens forwarded, decode steps and their mean time, and the FLOPs counted:
2 x non-embedding parameters x tokens forwarded, plus the attention's 4 x layers x hidden x context for every token forwarded
(context: the keys it attends to, prefix and padding included); the lm_head, run on one
position per row, is left out. Achieved FLOP/s is divided by the machine's matmul throughput,
measured here right before each run with a torch matmul of the decode's shape
(rows x hidden @ hidden x intermediate): per wall second, and per CPU second (both the run and
the matmul; with ``--threads 1`` the ratio that a shared machine changes least).

``--compare OTHER_SRC`` times another checkout's ``src`` (e.g. ``git archive main src | tar -x
-C /tmp/before``) against this one, each run in a fresh process, interleaved A/B/A/B (the
machine may be shared), and prints the medians of ``--reps`` runs each.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def matmul_flops(rows: int, hidden: int, inner: int, seconds: float = 1.0) -> tuple[float, float]:
    """FLOP per wall second and per CPU second of ``torch.matmul`` of (rows, hidden) @
    (hidden, inner), float32, repeated for about ``seconds`` (medians of 5 timed blocks)."""
    import torch

    a, b = torch.randn(rows, hidden), torch.randn(hidden, inner)
    for _ in range(10):
        a @ b
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < 0.1:
        a @ b
        n += 1
    reps = max(1, int(n * seconds / 0.5))
    wall, cpu = [], []
    for _ in range(5):
        start, start_cpu = time.perf_counter(), time.process_time()
        for _ in range(reps):
            a @ b
        wall.append(2 * rows * hidden * inner * reps / (time.perf_counter() - start))
        cpu.append(2 * rows * hidden * inner * reps / (time.process_time() - start_cpu))
    return statistics.median(wall), statistics.median(cpu)


def run_case(case: str, batch_size: int, long_items: int, long_tokens: int) -> dict:
    """One timed scoring run of ``case`` in this process (the code on ``sys.path``)."""
    import torch

    import palign.eval.scoring as scoring
    from palign.data import load_papi
    from palign.eval.prompts import few_shot_system_prompt
    from palign.eval.scoring import Scorer, ScoringConfig
    from palign.models import load_gguf_package

    data = load_papi(coding="as_stored")
    inv, subject = data.inventory, data.subjects[0]
    system = few_shot_system_prompt(
        inv.train_items, subject.answers([it.number for it in inv.train_items])
    )
    loaded = load_gguf_package("smollm2_135m")
    model, cfg = loaded.model, loaded.model.config
    paper = case == "paper"
    items = inv.test_items if paper else inv.test_items[:long_items]
    config = ScoringConfig(
        mode="generate",
        parse="reference",
        strip_period=False,
        batch_size=batch_size,
        max_new_tokens=15 if paper else long_tokens,
    )
    scorer = Scorer(loaded, config)
    if not paper:
        scorer._module.eos_ids = [-1]  # no token ends a reply: every row decodes every step

    forwards: list[tuple[int, int, int, float, float]] = []  # rows, queries, keys, wall, CPU s
    started: list[tuple[float, float]] = []

    def pre(module, args, kwargs):
        started.append((time.perf_counter(), time.process_time()))

    def post(module, args, kwargs, output):
        ids = kwargs["input_ids"]
        mask = kwargs.get("attention_mask")
        keys = mask.shape[1] if mask is not None else ids.shape[1]
        wall, cpu = started.pop()
        forwards.append(
            (
                ids.shape[0],
                ids.shape[1],
                keys,
                time.perf_counter() - wall,
                time.process_time() - cpu,
            )
        )

    handles = [
        model.register_forward_pre_hook(pre, with_kwargs=True),
        model.register_forward_hook(post, with_kwargs=True),
    ]
    scorer.score(system, items[:2])  # warm-up (2 rows)
    scorer._module.clear_prefix_cache()  # the timed run computes its prefix, as a subject does
    forwards.clear()
    peak, peak_cpu = matmul_flops(batch_size, cfg.hidden_size, cfg.intermediate_size)
    before = loaded.meter.snapshot()
    load = os.getloadavg()[0]
    start, cpu = time.perf_counter(), time.process_time()
    scorer.score(system, items)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    cost = loaded.meter.snapshot() - before
    for handle in handles:
        handle.remove()

    non_embedding = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n)
    tokens = sum(b * q for b, q, *_ in forwards)
    # each of a row's q query tokens attends to the keys before it and itself
    context = sum(b * sum(k - q + j + 1 for j in range(q)) for b, q, k, *_ in forwards)
    flops = 2 * non_embedding * tokens + 4 * cfg.num_hidden_layers * cfg.hidden_size * context
    decode = [(wall, cpu) for _, q, _, wall, cpu in forwards if q == 1]
    prompt_tokens = len(scorer.encode_prompts(system, items[:1])[0])
    return {
        "case": case,
        "items": len(items),
        "max_new_tokens": config.max_new_tokens,
        "prompt_tokens": prompt_tokens,
        "prefix_tokens": scorer._module.prefix_length,
        "wall_s": wall,
        "cpu_s": cpu,
        "load": (load + os.getloadavg()[0]) / 2,
        "generated": cost.generated_tokens,
        "tokens_per_s": cost.generated_tokens / wall,
        "tokens_per_cpu_s": cost.generated_tokens / cpu,
        "forward_calls": cost.forward_calls,
        "tokens_forwarded": cost.tokens_forwarded,
        "decode_steps": len(decode),
        "decode_step_ms": 1000 * statistics.mean(w for w, _ in decode) if decode else 0.0,
        "decode_step_cpu_ms": 1000 * statistics.mean(c for _, c in decode) if decode else 0.0,
        "decode_cpu_s": sum(c for _, c in decode),
        "forward_cpu_s": sum(f[4] for f in forwards),
        "flops": flops,
        "flop_per_s": flops / wall,
        "flop_per_cpu_s": flops / cpu,
        "matmul_flop_per_s": peak,
        "matmul_flop_per_cpu_s": peak_cpu,
        "mfu": flops / wall / peak,
        "mfu_cpu": flops / cpu / peak_cpu,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "scoring_module": scoring.__file__,
    }


def child(args) -> None:
    import torch

    os.environ.setdefault("TRANSFORMERS_SDPA_FORCE_GQA", "1")  # as hardware=cpu sets it
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run_case(args.case, args.batch_size, args.long_items, args.long_tokens)
    print("RESULT " + json.dumps(result), flush=True)


def spawn(src: str, case: str, args) -> dict:
    env = dict(os.environ, PYTHONPATH=src, TRANSFORMERS_SDPA_FORCE_GQA="1")
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--case",
        case,
        "--batch-size",
        str(args.batch_size),
        "--long-items",
        str(args.long_items),
        "--long-tokens",
        str(args.long_tokens),
        "--threads",
        str(args.threads),
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=HERE)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode or not lines:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


FIELDS = (
    ("wall_s", "wall s", "{:.1f}"),
    ("cpu_s", "CPU s", "{:.1f}"),
    ("load", "load avg", "{:.1f}"),
    ("generated", "generated", "{:.0f}"),
    ("tokens_per_s", "tokens/s", "{:.1f}"),
    ("tokens_per_cpu_s", "tokens/CPU-s", "{:.1f}"),
    ("forward_calls", "forwards", "{:.0f}"),
    ("tokens_forwarded", "tokens forwarded", "{:.0f}"),
    ("decode_step_ms", "decode step ms", "{:.1f}"),
    ("decode_step_cpu_ms", "decode step CPU ms", "{:.1f}"),
    ("flop_per_s", "GFLOP/s", "{:.2f}"),
    ("mfu", "of matmul", "{:.1%}"),
    ("flop_per_cpu_s", "GFLOP/CPU-s", "{:.2f}"),
    ("matmul_flop_per_cpu_s", "matmul GFLOP/CPU-s", "{:.1f}"),
    ("mfu_cpu", "of matmul (CPU)", "{:.1%}"),
)


def table(rows: list[tuple[str, list[dict]]]) -> str:
    head = "| case | code | runs | " + " | ".join(label for _, label, _ in FIELDS) + " |"
    lines = [head, "|" + "---|" * (len(FIELDS) + 3)]
    for label, runs in rows:
        cells = []
        for key, _, fmt in FIELDS:
            value = statistics.median(r[key] for r in runs)
            if key.startswith(("flop_per", "matmul_flop_per")):
                value /= 1e9
            cells.append(fmt.format(value))
        first = runs[0]
        case = f"{first['case']} ({first['items']} items, <= {first['max_new_tokens']} tokens)"
        lines.append(f"| {case} | {label} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=["paper", "long", "both"], default="both")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--compare", metavar="OTHER_SRC", help="another checkout's src to A/B")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--long-items", type=int, default=32)
    parser.add_argument("--long-tokens", type=int, default=150)
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads (0: torch's default, one a core)"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="write every run's numbers here")
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    this = str(HERE / "src")
    codes = [("before", args.compare), ("after", this)] if args.compare else [("this", this)]
    cases = ["paper", "long"] if args.case == "both" else [args.case]
    runs: dict[tuple[str, str], list[dict]] = {}
    for case in cases:
        for rep in range(args.reps):
            for label, src in codes:  # A/B/A/B: both codes see the same load on the machine
                result = spawn(src, case, args)
                runs.setdefault((case, label), []).append(result)
                print(
                    f"{case} {label} run {rep + 1}: {result['wall_s']:.1f} s, "
                    f"{result['tokens_per_s']:.1f} tokens/s",
                    file=sys.stderr,
                    flush=True,
                )
    first = next(iter(runs.values()))[0]
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
        f"{first['torch']}, threads {first['threads']}, batch {args.batch_size}, prompt "
        f"{first['prompt_tokens']} tokens (cached prefix {first['prefix_tokens']}), medians"
    )
    print(table([(label, r) for (_, label), r in runs.items()]))
    if args.json:
        Path(args.json).write_text(json.dumps({f"{c} {code}": r for (c, code), r in runs.items()}))


if __name__ == "__main__":
    main()
