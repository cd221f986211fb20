"""Read back what an offline W&B run logged, from its ``run-<id>.wandb`` file.

The file is a LevelDB-style log (a 7-byte header, then 32 KiB blocks of chunks, each with a
7-byte header: crc32c, length, type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4) of ``Record``
protobufs from ``wandb.proto.wandb_internal_pb2``.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32 * 1024
HEADER = 7


def _records(path: Path) -> list[bytes]:
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    records, chunks, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block trailer padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        pos += HEADER
        chunks += data[pos : pos + length]
        pos += length
        if kind in (1, 4):
            records.append(chunks)
            chunks = b""
    return records


def read_wandb_run(run_dir: Path, wait_s: float = 60.0) -> dict:
    """The single offline W&B run under ``run_dir/wandb``: its run fields, final summary,
    history rows, metric definitions (metric name or glob -> its ``step_metric``, "" for the
    default axis; the last definition of each), artifacts (name -> file paths) and exit code.
    The run is read once it is finished: wandb-core (another process) may still be writing its
    last records when ``finish()`` has returned on a busy machine, so the file is read again
    until its exit record is there (at most ``wait_s`` seconds)."""
    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    deadline = time.monotonic() + wait_s
    out = _parse(path)
    while out["exit_code"] is None and time.monotonic() < deadline:
        time.sleep(0.5)
        out = _parse(path)
    return out


def _parse(path: Path) -> dict:
    out = {
        "run": {},
        "summary": {},
        "history": [],
        "metrics": {},
        "artifacts": {},
        "exit_code": None,
    }
    for raw in _records(path):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            out["run"] = dict(
                group=r.run_group,
                project=r.project,
                tags=list(r.tags),
                display_name=r.display_name,
                job_type=r.job_type,
            )
        elif kind == "summary":
            for item in record.summary.update:
                out["summary"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "history":
            out["history"].append(
                {
                    i.key or "/".join(i.nested_key): json.loads(i.value_json)
                    for i in record.history.item
                }
            )
        elif kind == "metric":
            m = record.metric
            out["metrics"][m.name or m.glob_name] = m.step_metric
        elif kind == "artifact":
            contents = record.artifact.manifest.contents
            out["artifacts"][record.artifact.name] = [c.path for c in contents]
        elif kind == "exit":
            out["exit_code"] = record.exit.exit_code
    return out


def read_wandb_table(run_dir: Path, key: str) -> dict:
    """The last ``wandb.Table`` logged under ``key`` by the offline W&B run under
    ``run_dir/wandb``, from its ``files/`` dir: ``{"columns": [...], "data": [[...], ...]}``.
    (History holds a table as nested keys ``<key>/_type``, ``<key>/path``, ...)"""
    (files,) = run_dir.glob("wandb/offline-run-*/files")
    refs = [h for h in read_wandb_run(run_dir)["history"] if f"{key}/path" in h]
    assert refs and refs[-1][f"{key}/_type"] == "table-file", f"no table {key} in {run_dir}"
    return json.loads((files / refs[-1][f"{key}/path"]).read_text())
