"""benchmarks/bench_gpu.py at the tiny shape on the CPU: it runs, and its numbers are finite and
add up (phases' forwards = the meter's count, per-subject shares, extrapolations, FLOPs)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench_gpu.py"
FORWARD_PHASES = ("activations", "alpha_search", "evaluation")
DPO_PHASES = ("dpo_reference", "dpo_train", "dpo_evaluation")


RUNS = {
    "plain": ("--subjects", "2", "--dpo-steps", "2"),
    "4bit": ("--quant4bit", "--layers", "1", "--subjects", "1", "--dpo-steps", "1"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[dict, str]]:
    """Both benchmark runs, started together (one thread each: the tiny model gains nothing from
    more, and oversubscribed OpenMP threads spin on a small machine shared with other tests)."""
    tmp = tmp_path_factory.mktemp("bench_gpu")
    procs = {}
    for name, args in RUNS.items():
        with open(tmp / f"{name}.out", "w") as stdout, open(tmp / f"{name}.err", "w") as stderr:
            procs[name] = subprocess.Popen(
                [sys.executable, str(BENCH), "--device", "cpu", "--shape", "tiny", *args]
                + ["--json", str(tmp / f"{name}.json")],
                stdout=stdout,
                stderr=stderr,
                cwd=ROOT,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )
    out = {}
    try:
        for name, proc in procs.items():
            proc.wait(timeout=300)
            err = (tmp / f"{name}.err").read_text()
            assert proc.returncode == 0, f"{name}: {err[-4000:]}"
            result = json.loads((tmp / f"{name}.json").read_text())
            out[name] = (result, (tmp / f"{name}.out").read_text())
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    return out


def _numbers(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from _numbers(v)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield value


def _check_consistent(r: dict, dpo: bool) -> None:
    assert all(math.isfinite(x) for x in _numbers(r))
    phases = r["phases"]
    forward = FORWARD_PHASES + (DPO_PHASES if dpo else ())
    assert set(phases) == {"build", "probes", "probe_only", *forward}
    for name, row in phases.items():
        assert row["seconds"] > 0, name
        assert row["mfu"] is None and row["peak_mem_bytes"] is None, name  # CPU: no peak, no GPU
        if name in forward:
            assert row["tokens_forwarded"] >= row["forward_calls"] > 0, name
            assert row["tokens_per_s"] == pytest.approx(row["tokens_forwarded"] / row["seconds"])
            factor = 6 if name == "dpo_train" else 2
            assert (
                row["model_flops"] == factor * r["params_non_embedding"] * row["tokens_forwarded"]
            )
        else:
            assert row["forward_calls"] == row["tokens_forwarded"] == 0, name
    # Every forward of the run is in exactly one phase.
    total = r["meter_total"]
    assert sum(row["forward_calls"] for row in phases.values()) == total["forward_calls"]
    assert sum(row["tokens_forwarded"] for row in phases.values()) == total["tokens_forwarded"]
    assert total["generated_tokens"] == 0  # logit scoring
    n, s = r["subjects"], r["per_subject"]
    assert s["evaluation_s"] == pytest.approx(phases["evaluation"]["seconds"] / n)
    assert s["pas_total_s"] == pytest.approx(
        phases["activations"]["seconds"] / 300
        + s["probes_s"]
        + s["alpha_search_s"]
        + s["evaluation_s"]
    )
    assert r["pas_300_extrapolated"] is True
    assert r["pas_300_subjects_s"] == pytest.approx(
        phases["activations"]["seconds"] + 300 * (s["pas_total_s"] - s["activations_amortised_s"])
    )
    assert r["peak_flops"] is None and r["peak_mem_bytes"] is None
    if dpo:
        assert r["dpo_extrapolated"] is True
        assert s["dpo_s"] == pytest.approx(sum(phases[k]["seconds"] for k in DPO_PHASES))
        assert r["dpo_paper_steps_s"] > s["dpo_s"]


def test_tiny_cpu_benchmark_numbers_add_up(runs):
    r, stdout = runs["plain"]
    _check_consistent(r, dpo=True)
    assert (r["shape"], r["layers"], r["layers_cut_because"]) == ("tiny", 2, None)
    assert r["quant4bit"] is False and r["linear4bit_modules"] == 0
    assert r["params_non_embedding_counted"] == r["params_non_embedding"]
    assert r["phases"]["dpo_train"]["steps"] == 2
    assert r["probe_only"] == {"subjects": 8, "heads": 32, "dim": 8}
    assert "| phase | seconds | s / subject |" in stdout
    assert "PAS for 300 subjects" in stdout and "extrapolated" in stdout


def test_tiny_cpu_benchmark_in_4bit_with_cut_layers(runs):
    r, stdout = runs["4bit"]
    _check_consistent(r, dpo=True)
    assert r["quant4bit"] is True and r["linear4bit_modules"] == 7  # q k v o gate up down
    assert (r["layers"], r["layers_full"], r["layers_cut_because"]) == (1, 2, "--layers 1")
    assert r["pas"]["top_k"] == 16  # all 16 heads of the one layer
    assert "CUT to 1 of 2 layers" in stdout and "nf4 4-bit" in stdout
