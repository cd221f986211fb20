"""The ready-made launcher scripts: one node running shards in parallel (on CPU here, the
"GPUs" being two processes) then merging them, and the SLURM array submission (dry run: no
SLURM on the test machine)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [str(ROOT / "launchers" / name), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        env={**os.environ, "PY": sys.executable, **env},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_multi_gpu_node_runs_shards_in_parallel_merges_and_resumes(tmp_path):
    out = tmp_path / "node"
    args = [str(out), "model=tiny_llama", "method=no_change", "dataset.limit=3"]
    _script("multi_gpu_node.sh", *args, PALIGN_GPUS="2")
    shards = [json.loads((out / "shards" / i / "summary.json").read_text()) for i in "01"]
    merged = json.loads((out / "merged" / "summary.json").read_text())
    assert [s["shard"] for s in shards] == ["0/2", "1/2"]
    assert sorted(merged["cases"]) == sorted(shards[0]["cases"] + shards[1]["cases"])
    assert merged["n_subjects"] == 3 and merged["merged_from"] == [
        str(out / "shards" / i) for i in "01"
    ]
    # The same command again resumes every shard: nothing is evaluated twice.
    _script("multi_gpu_node.sh", *args, PALIGN_GPUS="2")
    logs = [(out / "logs" / f"shard-{i}.log").read_text() for i in "01"]
    assert "2 finished subject(s) found" in logs[0] and "1 finished subject(s) found" in logs[1]
    assert json.loads((out / "merged" / "summary.json").read_text())["score"] == merged["score"]


def test_slurm_shards_dry_run_submits_an_array_and_a_dependent_merge():
    done = _script(
        "slurm_shards.sh",
        "--dry-run",
        "outputs/pas_8b",
        "16",
        "method=pas",
        "model=llama3_8b",
        PALIGN_SLURM_PARTITION="a100",
        PALIGN_SLURM_TIME="02:00:00",
    )
    array, merge = done.stdout.strip().splitlines()
    assert "--array=0-15" in array and "--partition=a100" in array and "--requeue" in array
    assert "--time=02:00:00" in array and "shard_job.sh" in array and "model=llama3_8b" in array
    assert merge.startswith("sbatch --dependency=afterok:") and "palign.merge" in merge
