"""model=openai against a real OpenAI-compatible server: ``transformers serve`` (FastAPI and
Uvicorn, the ``serving`` extra of transformers) started on 127.0.0.1 with a random tiny Llama
saved to disk. Not palign's fake server (test_hosted.py): the requests, replies, usage and the
absence of logprobs are what this server really sends."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from conftest import TINY_LLAMA
from palign.eval.prompts import NEUTRAL_SYSTEM_PROMPT, item_question
from palign.models import load_random
from test_bad_inputs import invoke
from test_hosted import answers, error_line, rows

TEST_ITEMS = 180


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """``transformers serve`` on a saved tiny Llama (initializer_range 0.2: it says varied
    words); yields (base URL, model folder, the model as loaded here)."""
    root = tmp_path_factory.mktemp("served")
    folder = root / "tiny"
    loaded = load_random("tiny_llama", dict(TINY_LLAMA, initializer_range=0.2), seed=0)
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    port = _free_port()
    cli = Path(sys.executable).with_name("transformers")
    log = open(root / "server.log", "wb")  # noqa: SIM115 (open while the server runs)
    proc = subprocess.Popen(
        [str(cli), "serve", str(folder), "--host", "127.0.0.1", "--port", str(port),
         "--device", "cpu"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((root / "server.log").read_text()[-3000:])
            time.sleep(0.5)
        yield f"{url}/v1", folder, loaded
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def served_argv(url: str, folder: Path, run_dir: Path, *more: str) -> list[str]:
    return [
        "model=openai",
        f"model.base_url={url}",
        f"model.model={folder}",
        "model.api_key_env=null",
        "model.max_concurrency=4",
        "model.price_input_per_mtok=null",
        "model.price_output_per_mtok=null",
        "model.max_tokens=8",
        "method=no_change",
        "dataset.limit=1",
        f"hydra.run.dir={run_dir}",
        *more,
    ]


def test_a_run_against_transformers_serve(served, papi, tmp_path, monkeypatch, capsys):
    url, folder, loaded = served
    monkeypatch.setenv("PALIGN_CACHE", str(tmp_path / "cache"))
    run_dir = tmp_path / "run"
    assert (
        invoke("palign", served_argv(url, folder, run_dir, "scoring.mode=generate"), monkeypatch)
        == 0
    )
    table = answers(run_dir, "no_change")
    assert len(table) == TEST_ITEMS
    (row,) = rows(run_dir, "no_change").values()
    cost = row["cost"]["answer"]
    assert cost["requests"] == TEST_ITEMS and cost["cached"] == 0 and cost["retries"] == 0
    assert cost["input_tokens"] > 50 * TEST_ITEMS  # the server's own usage counts, read
    assert 0 < cost["output_tokens"] <= 8 * TEST_ITEMS
    # every reply kept; those naming no option counted as UNK
    assert row["unk_rate"] == pytest.approx((~table["parsed"]).mean())
    # what the server replied is transformers' greedy decode of palign's messages
    tok = loaded.tokenizer
    items = {it.number: it for it in papi.inventory.test_items}
    for number, text in list(zip(table["item"], table["text"], strict=True))[:3]:
        messages = [
            {"role": "system", "content": NEUTRAL_SYSTEM_PROMPT},
            {"role": "user", "content": item_question(items[number])},
        ]
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            new = loaded.model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False
            )[0, ids.shape[1] :]
        assert text == tok.decode(new, skip_special_tokens=True)
    # again: every reply from the response cache, the same answers
    again = tmp_path / "again"
    assert (
        invoke("palign", served_argv(url, folder, again, "scoring.mode=generate"), monkeypatch) == 0
    )
    (row,) = rows(again, "no_change").values()
    assert row["cost"]["answer"]["requests"] == 0
    assert row["cost"]["answer"]["cached"] == TEST_ITEMS
    assert answers(again, "no_change")["text"].tolist() == table["text"].tolist()
    # logit mode: this server returns no logprobs; its first reply says so, in one line
    capsys.readouterr()
    assert invoke("palign", served_argv(url, folder, tmp_path / "logit"), monkeypatch) == 1
    err = capsys.readouterr().err
    assert "returned no logprobs" in error_line(err)
    assert json.loads((again / "summary.json").read_text())["n_subjects"] == 1
