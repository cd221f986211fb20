"""model=openai: prompting methods through an OpenAI-compatible chat API, against a local
server these tests start on 127.0.0.1 (no internet): answers parsed and scored end to end, the
logprobs mode, injected faults (429 with Retry-After, 500, a timeout, malformed JSON, a reply
cut short, a server that keeps failing), the API key in no file a run writes, the response
cache (a rerun and a resume send nothing twice), the request and spend caps, the stop policy,
and the methods that need weights refused."""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from palign import stopping
from palign.constants import ANSWER_LABELS, LETTER_SCORE, OPTION_LETTERS
from palign.errors import ConfigError, Stopped
from palign.eval.hosted import letter_probs
from palign.models.hosted import HostedModel, HostedSettings
from test_bad_inputs import invoke

#: The API key the tests put in the environment: it must appear in no file a run writes.
KEY = "sk-palign-test-KEY-7f3a9c1e5b"
#: Every reply's usage: tokens in and out (the cost caps count these).
USAGE = {"prompt_tokens": 50, "completion_tokens": 5, "total_tokens": 55}
TEST_ITEMS = 180


def letter_of(messages: list[dict]) -> str:
    """The option the server answers to ``messages`` (fixed per question)."""
    digest = hashlib.sha256(messages[-1]["content"].encode()).digest()
    return OPTION_LETTERS[digest[0] % 5]


def completion(messages: list[dict], logprobs: bool, finish: str = "stop", text: str | None = None):
    letter = letter_of(messages)
    label = ANSWER_LABELS[LETTER_SCORE[letter]]
    pieces = ["Option", " (", letter, ").", f" {label}"]
    content = "".join(pieces) if text is None else text
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": content},
        "finish_reason": finish,
        "logprobs": None,
    }
    if logprobs and text is None:
        choice["logprobs"] = {
            "content": [
                {
                    "token": p,
                    "logprob": math.log(0.6) if p == letter else 0.0,
                    "top_logprobs": [
                        {"token": x, "logprob": math.log(0.6 if x == letter else 0.1)}
                        for x in OPTION_LETTERS
                    ]
                    if p == letter
                    else [{"token": p, "logprob": 0.0}],
                }
                for p in pieces
            ]
        }
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 0,
        "model": "test-model",
        "choices": [choice],
        "usage": USAGE,
    }


class Server:
    """An OpenAI-compatible ``/v1/chat/completions`` on 127.0.0.1 (a ThreadingHTTPServer in a
    thread). ``faults``: by the order in which a question is first seen (0, 1, ...), what its
    successive attempts get (``429``, ``500``, ``timeout``, ``malformed``, ``length``, then a
    normal reply); ``fail_after``: every request after that many normal replies gets a 500;
    ``status``: every request gets this error; ``logprobs``: whether replies carry them;
    ``delay``: seconds before each reply. ``log``: (time, question digest, what was sent)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.reset()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real servers

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.handle(self, body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def reset(self, **settings):
        with self.lock:
            self.log: list[tuple[float, str, str]] = []
            self.seen: dict[str, int] = {}
            self.attempts: dict[str, int] = {}
            self.auth: set[str] = set()
            self.faults: dict[int, list[str]] = settings.get("faults", {})
            self.fail_after: int | None = settings.get("fail_after")
            self.status: int | None = settings.get("status")
            self.logprobs: bool = settings.get("logprobs", True)
            self.delay: float = settings.get("delay", 0.0)

    @property
    def ok(self) -> int:
        """Normal replies sent."""
        return sum(what == "ok" for _, _, what in self.log)

    def handle(self, request: BaseHTTPRequestHandler, body: dict) -> None:
        messages = body["messages"]
        digest = hashlib.sha256(json.dumps(messages).encode()).hexdigest()
        with self.lock:
            self.auth.add(request.headers.get("Authorization", ""))
            order = self.seen.setdefault(digest, len(self.seen))
            attempt = self.attempts[digest] = self.attempts.get(digest, -1) + 1
            plan = self.faults.get(order, [])
            what = plan[attempt] if attempt < len(plan) else "ok"
            if self.status is not None:
                what = str(self.status)
            elif self.fail_after is not None and self.ok >= self.fail_after:
                what = "500"
            self.log.append((time.monotonic(), digest, what))
        if self.delay:
            time.sleep(self.delay)
        try:
            if what == "timeout":
                time.sleep(1.5)
                return
            if what == "malformed":
                return self.send(request, 200, b'{"choices": [{"mess', {})
            if what.isdigit():
                error = {
                    "error": {
                        "message": f"injected {what}; key {request.headers.get('Authorization')}"
                    }
                }
                headers = {"Retry-After": "1"} if what == "429" else {}
                return self.send(request, int(what), json.dumps(error).encode(), headers)
            logprobs = bool(body.get("logprobs")) and self.logprobs
            if what == "length":
                reply = completion(messages, logprobs, "length", text="Option")
            else:
                reply = completion(messages, logprobs)
            self.send(request, 200, json.dumps(reply).encode(), {})
        except (BrokenPipeError, ConnectionResetError):
            pass

    @staticmethod
    def send(request, status: int, data: bytes, headers: dict) -> None:
        request.send_response(status)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        for k, v in headers.items():
            request.send_header(k, v)
        request.end_headers()
        request.wfile.write(data)


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    s.httpd.shutdown()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The API key and a fresh palign cache in the environment for the module."""
    root = tmp_path_factory.mktemp("hosted")
    saved = {k: os.environ.get(k) for k in ("OPENAI_API_KEY", "PALIGN_CACHE")}
    os.environ["OPENAI_API_KEY"] = KEY
    os.environ["PALIGN_CACHE"] = str(root / "cache")
    yield root
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def argv(server: Server, run_dir: Path, *more: str) -> list[str]:
    return [
        "model=openai",
        f"model.base_url={server.url}",
        "model.max_retries=2",
        "model.timeout_s=0.5",
        "model.price_input_per_mtok=1000",
        "model.price_output_per_mtok=1000",
        "method=few_shot",
        "dataset.limit=2",
        "scoring.mode=generate",
        f"hydra.run.dir={run_dir}",
        *more,
    ]


def rows(run_dir: Path, method: str = "few_shot") -> dict[int, dict]:
    return {
        json.loads(p.read_text())["case"]: json.loads(p.read_text())
        for p in sorted((run_dir / "results" / method).glob("*.json"))
    }


def answers(run_dir: Path, method: str = "few_shot") -> pd.DataFrame:
    files = sorted((run_dir / "answers" / method).glob("*.csv"))
    return pd.concat([pd.read_csv(p, keep_default_na=False) for p in files], ignore_index=True)


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if "error: " in line]
    assert len(lines) == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    return lines[0]


def no_key_in(*roots: Path) -> None:
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file():
                assert KEY.encode() not in path.read_bytes(), path


#: Per request at the test prices: 50 tokens in and 5 out at $1000 per million each.
REQUEST_USD = (USAGE["prompt_tokens"] + USAGE["completion_tokens"]) * 1000 / 1e6


@pytest.fixture(scope="module")
def first_run(server, env, tmp_path_factory):
    """few_shot on 2 subjects, generation mode, against the server; the run dir."""
    server.reset()
    run_dir = env / "first"
    mp = pytest.MonkeyPatch()
    try:
        assert invoke("palign", argv(server, run_dir), mp) == 0
    finally:
        mp.undo()
    return run_dir


def test_a_few_shot_run_is_answered_parsed_and_scored(first_run, server, env):
    assert server.ok == 2 * TEST_ITEMS and len(server.log) == 2 * TEST_ITEMS
    assert server.auth == {f"Bearer {KEY}"}  # the key goes to the server, and nowhere else
    table = answers(first_run)
    assert len(table) == 2 * TEST_ITEMS and table["parsed"].all()
    letters = table["text"].str.slice(8, 9)  # "Option (B). Moderately Accurate"
    assert (table["predicted"] == letters.map(LETTER_SCORE)).all()
    assert table["predicted"].nunique() == 5
    for row in rows(first_run).values():
        cost = row["cost"]["answer"]
        assert cost["requests"] == TEST_ITEMS and cost["cached"] == 0
        assert cost["input_tokens"] == TEST_ITEMS * 50 and cost["output_tokens"] == TEST_ITEMS * 5
        assert cost["cost_usd"] == pytest.approx(TEST_ITEMS * REQUEST_USD)
        assert row["cost"]["align"]["requests"] == 0
    summary = json.loads((first_run / "summary.json").read_text())
    assert summary["model"] == "gpt-4o"
    assert summary["cost"]["per_subject"]["total"]["requests"] == TEST_ITEMS
    assert "API requests per subject" in (first_run / "report.md").read_text()
    no_key_in(first_run, env / "cache")


def test_a_rerun_sends_no_request_it_sent_before(first_run, server, env, monkeypatch):
    before = len(server.log)
    again = env / "again"
    assert invoke("palign", argv(server, again), monkeypatch) == 0
    assert len(server.log) == before  # every reply from the cache
    for case, row in rows(again).items():
        assert row["cost"]["answer"]["cached"] == TEST_ITEMS
        assert row["cost"]["answer"]["requests"] == 0
        assert row["score"] == rows(first_run)[case]["score"]
    no_key_in(again, env / "cache")


def test_logit_mode_reads_the_top_logprobs_of_the_answer_letter(server, env, monkeypatch):
    server.reset()
    run_dir = env / "logit"
    args = [a for a in argv(server, run_dir, "dataset.limit=1") if "scoring.mode" not in a]
    assert invoke("palign", args, monkeypatch) == 0  # protocol=clean: scoring.mode=logit
    table = answers(run_dir)
    probs = table[[f"p_{x}" for x in OPTION_LETTERS]].to_numpy(dtype=float)
    chosen = 5 - table["predicted"].to_numpy()
    assert np.allclose(probs[np.arange(len(table)), chosen], 0.6)
    assert np.allclose(probs.sum(1), 1.0)
    assert (table["text"].str.slice(8, 9).map(LETTER_SCORE) == table["predicted"]).all()


def test_a_server_without_logprobs_in_logit_mode_is_one_error(server, env, monkeypatch, capsys):
    server.reset(logprobs=False)
    run_dir = env / "nologprobs"
    args = [a for a in argv(server, run_dir, "dataset.limit=1") if "scoring.mode" not in a]
    args += ["model.cache=false", "model.max_concurrency=1"]
    assert invoke("palign", args, monkeypatch) == 1
    err = capsys.readouterr().err
    assert "returned no logprobs" in error_line(err)
    assert "hint: use scoring.mode=generate" in err
    # the first reply tells (not the subject's 180th): at most the request that the worker
    # took while the error reached the main thread is sent after it
    assert 1 <= len(server.log) < 20


def test_faults_are_retried_or_kept_as_unparseable(server, env, monkeypatch):
    """By the order the server first sees them: question 0 gets a 429 (Retry-After: 1), 1 a
    500, 2 a timeout (each then answered); 3 malformed JSON on every try (kept as
    unparseable); 4 a reply cut short (kept as unparseable)."""
    faults = {0: ["429"], 1: ["500"], 2: ["timeout"], 3: ["malformed"] * 3, 4: ["length"]}
    server.reset(faults=faults)
    run_dir = env / "faults"
    args = argv(server, run_dir, "dataset.limit=1", "model.max_concurrency=4", "model.cache=false")
    assert invoke("palign", args, monkeypatch) == 0
    table = answers(run_dir)
    assert len(table) == TEST_ITEMS and (~table["parsed"]).sum() == 2
    assert list(table.loc[~table["parsed"], "text"].sort_values()) == ["", "Option"]
    (row,) = rows(run_dir).values()
    cost = row["cost"]["answer"]
    assert cost["retries"] == 3 and cost["malformed"] == 1 and cost["cut_short"] == 1
    assert cost["requests"] == TEST_ITEMS + 2  # the malformed one asked three times
    by_question: dict[str, list[tuple[float, str]]] = {}
    for t, digest, what in server.log:
        by_question.setdefault(digest, []).append((t, what))
    tries = list(by_question.values())
    assert [w for _, w in tries[0]] == ["429", "ok"] and tries[0][1][0] - tries[0][0][0] >= 0.95
    assert [w for _, w in tries[1]] == ["500", "ok"]
    assert [w for _, w in tries[2]] == ["timeout", "ok"]
    assert [w for _, w in tries[3]] == ["malformed"] * 3
    assert [w for _, w in tries[4]] == ["length"]


def test_a_server_that_keeps_failing_is_one_error_and_keeps_finished_subjects(
    server, env, monkeypatch, capsys
):
    server.reset(fail_after=TEST_ITEMS)
    run_dir = env / "failing"
    args = argv(server, run_dir, "model.max_retries=1", "model.cache=false")
    assert invoke("palign", args, monkeypatch) == 1
    line = error_line(capsys.readouterr().err)
    assert f"model.base_url={server.url}" in line and "HTTP 500" in line, line
    assert len(rows(run_dir)) == 1  # the first subject's row is kept


def test_the_key_echoed_by_the_server_is_in_no_error_and_no_file(server, env, monkeypatch, capsys):
    server.reset(status=401)
    run_dir = env / "unauthorised"
    args = argv(server, run_dir, "dataset.limit=1", "model.cache=false")
    assert invoke("palign", args, monkeypatch) == 1
    out, err = capsys.readouterr()
    line = error_line(err)
    assert "HTTP 401" in line and "OPENAI_API_KEY" in err
    assert KEY not in out + err
    no_key_in(run_dir, env / "cache")


def test_max_requests_stops_the_run_with_one_line_and_a_resume_sends_only_the_rest(
    server, env, monkeypatch, capsys
):
    server.reset()
    monkeypatch.setenv("PALIGN_CACHE", str(env / "capped_cache"))  # nothing cached yet
    run_dir = env / "capped"
    args = argv(server, run_dir, "model.max_requests=200")
    assert invoke("palign", args, monkeypatch) == 1
    line = error_line(capsys.readouterr().err)
    assert "model.max_requests=200 reached" in line
    assert server.ok == 200 and len(rows(run_dir)) == 1
    resume = [a for a in args if not a.startswith("hydra.run.dir")]
    resume[resume.index("model.max_requests=200")] = "model.max_requests=null"
    assert invoke("palign", [*resume, f"resume={run_dir}"], monkeypatch) == 0
    assert server.ok == 2 * TEST_ITEMS  # the 20 answered before the stop came from the cache
    assert len(rows(run_dir)) == 2


def test_max_cost_stops_the_run_before_passing_it(server, env, monkeypatch, capsys):
    server.reset()
    run_dir = env / "costly"
    max_cost = 1.5 * TEST_ITEMS * REQUEST_USD  # one subject and a half
    args = argv(server, run_dir, "model.cache=false", f"model.max_cost={max_cost}")
    assert invoke("palign", args, monkeypatch) == 1
    line = error_line(capsys.readouterr().err)
    assert f"model.max_cost={max_cost} reached" in line
    assert server.ok * REQUEST_USD <= max_cost
    assert server.ok > TEST_ITEMS and len(rows(run_dir)) == 1


@pytest.mark.parametrize(
    "more, culprit",
    [
        (["method=pas"], "method=pas needs the model's weights; model=openai"),
        (["compare=[dpo_smoke]"], "compare[0]=dpo_smoke needs the model's weights"),
        (["method=psoups_smoke"], "method=psoups_smoke needs the model's weights"),
    ],
)
def test_methods_that_need_weights_are_refused_before_any_folder(
    server, env, monkeypatch, capsys, more, culprit
):
    run_dir = env / "refused"
    assert invoke("palign", argv(server, run_dir, *more), monkeypatch) == 1
    line = error_line(capsys.readouterr().err)
    assert culprit in line and "serves only prompting methods" in line, line
    assert not run_dir.exists()


def test_a_stop_between_requests_ends_the_requests_at_a_safe_point(server, env):
    server.reset(delay=0.05)
    model = HostedModel(HostedSettings(name="m", model="m", base_url=server.url,
                                       max_concurrency=2, cache=False))  # fmt: skip
    requests = [[{"role": "user", "content": f"question {i}"}] for i in range(100)]
    timer = threading.Timer(0.4, os.kill, (os.getpid(), signal.SIGTERM))
    with pytest.raises(Stopped), stopping.stop_on_signals():
        timer.start()
        model.complete_all(requests)
    sent = len(server.log)
    assert 0 < sent < 100
    time.sleep(0.2)
    assert len(server.log) == sent  # nothing sent after the stop
    assert model.meter.snapshot().requests == sent


def test_settings_are_checked_with_one_line_naming_the_key():
    for values, culprit in [
        ({"max_concurrency": 0}, "model.max_concurrency=0"),
        ({"base_url": "localhost:8000"}, "model.base_url='localhost:8000'"),
        ({"max_cost": 1.0}, "model.max_cost=1.0 needs model.price_input_per_mtok"),
        ({"top_logprobs": 21}, "model.top_logprobs=21"),
        ({"api_key_env": "not a name"}, "model.api_key_env='not a name'"),
    ]:
        with pytest.raises(ConfigError, match=culprit.replace("[", r"\[").replace("(", r"\(")):
            HostedSettings(name="m", model="m", **values)


def test_letter_probabilities_are_read_at_the_answer_token():
    tokens = [
        {"token": "Option", "logprob": 0.0, "top_logprobs": []},
        {"token": " (", "logprob": 0.0, "top_logprobs": []},
        {"token": "B", "logprob": math.log(0.5), "top_logprobs": [
            {"token": "B", "logprob": math.log(0.5)}, {"token": " A", "logprob": math.log(0.2)},
            {"token": "(A", "logprob": math.log(0.1)}, {"token": "so", "logprob": math.log(0.2)},
        ]},
    ]  # fmt: skip
    probs = letter_probs(tokens, len("Option ("))
    assert probs == pytest.approx([0.375, 0.625, 0, 0, 0])
    assert letter_probs(tokens, 100) is None
