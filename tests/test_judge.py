"""evaluation=open_ended and ``palign judge``: the open-ended replies of an aligned tiny model
saved per method and case (and kept on resume), the judge's rating parser on many shapes of
text, the judge against a local fake OpenAI-compatible server returning canned judgments (some
unparseable) with the counts, means, bootstrap intervals and win rates checked against numbers
worked out by hand, the cache (a second judge sends nothing), and bad inputs as one line."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from palign import CONF_DIR
from palign.cli import judge as judge_cli
from palign.config import plan, register_all
from palign.config.schema import compose_checked
from palign.constants import ANSWER_LABELS
from palign.data.papi import Item
from palign.errors import ConfigError, RunDirError
from palign.eval.judge import RATING_NAMES, judge_request, parse_rating, read_judgments
from palign.eval.replies import read_replies, reply_table, write_replies
from palign.report.judge import judge_section
from palign.rundir import RunDir, check_resume
from palign.runs.merge import merge
from palign.runs.runner import run

OPEN_ENDED = [
    "model=tiny_llama",
    "method=no_change",
    "compare=[few_shot]",
    "evaluation=open_ended",
    "evaluation.items=4",
    "evaluation.max_new_tokens=6",
    "dataset.limit=2",
]


def composed(overrides: list[str], out: Path | None = None):
    register_all()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    if out is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(out)
    return cfg


@pytest.fixture(scope="module")
def open_run(tmp_path_factory, papi):
    """The open-ended run (the ``papi`` fixture: skipped without the PAPI files)."""
    out = tmp_path_factory.mktemp("open_ended") / "run"
    run(composed(OPEN_ENDED, out))
    return out


# --- evaluation=open_ended ------------------------------------------------------------------


def test_open_ended_replies_saved_per_method_and_case(open_run, papi):
    rd = RunDir(open_run)
    files = rd.reply_files()
    assert sorted(files) == ["few_shot", "no_change"]
    cases = [s.case for s in papi.subjects[:2]]
    test_items = list(papi.inventory.test_items)[:4]
    for method, paths in files.items():
        assert [int(p.stem) for p in paths] == sorted(cases)
        for path in paths:
            table = read_replies(path)
            case = int(path.stem)
            subject = next(s for s in papi.subjects if s.case == case)
            assert list(table["item"]) == [it.number for it in test_items]
            assert (table["method"] == method).all() and (table["case"] == case).all()
            assert list(table["target"]) == list(subject.answers([it.number for it in test_items]))
            for it, prompt in zip(test_items, table["prompt"], strict=True):
                assert prompt.startswith("Tell me about yourself")
                assert it.text.strip().rstrip(".") in prompt
            assert table["reply"].map(type).eq(str).all()
    # the inventory evaluation is computed as under evaluation=inventory
    summary = json.loads((open_run / "summary.json").read_text())
    assert summary["n_subjects"] == 2
    for method in ("no_change", "few_shot"):
        assert len(rd.finished_rows(method)) == 2
        assert len(rd.answers_files(method)) == 2


def test_open_ended_replies_kept_on_resume(open_run):
    rd = RunDir(open_run)
    before = {p: p.stat().st_mtime_ns for ps in rd.reply_files().values() for p in ps}
    run(composed([*OPEN_ENDED, f"resume={open_run}"], open_run))
    after = {p: p.stat().st_mtime_ns for ps in rd.reply_files().values() for p in ps}
    assert after == before


def test_open_ended_pas_replies_under_the_alpha_chosen_on_the_test_items(tmp_path, monkeypatch):
    monkeypatch.setenv("PALIGN_CACHE", str(tmp_path / "cache"))
    pas = ["method=pas", "method.top_k=4", "method.alphas=[0,4]", "method.folds=2"]
    overrides = ["model=tiny_llama", *pas, "protocol=paper", "dataset.limit=1"]
    out = tmp_path / "pas"
    run(composed([*overrides, "evaluation=open_ended", "evaluation.items=3",
                  "evaluation.max_new_tokens=4"], out))  # fmt: skip
    rd = RunDir(out)
    paths = rd.reply_files()["pas"]
    assert len(paths) == 1
    for path in paths:
        assert len(read_replies(path)) == 3
        row = rd.finished_rows("pas")[int(path.stem)]
        assert row.selected_on_test_items == "alpha" and row.align_info["alpha"] in (0.0, 4.0)


#: The methods that answer with changed weights or activations, in one open-ended run.
WEIGHT_METHODS = ["dpo_smoke", "ppo_smoke", "psoups_smoke", "prompt_morl_smoke", "pas_soup_smoke"]


def test_trained_and_population_methods_reply_as_aligned(tmp_path, monkeypatch):
    """DPO, PPO and the population methods reply with their change in place: the DPO subject's
    replies are those of the base model with the saved adapter loaded by PEFT and decoded by
    transformers' own greedy ``generate`` (no palign scoring code), and they are not the base
    model's."""
    import torch

    from palign.config import build
    from palign.eval.prompts import NEUTRAL_SYSTEM_PROMPT
    from palign.eval.scoring import Scorer, ScoringConfig
    from palign.methods.lora import AdapterArtifact

    monkeypatch.setenv("PALIGN_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    methods = [f"method={WEIGHT_METHODS[0]}", f"compare=[{','.join(WEIGHT_METHODS[1:])}]"]
    # initializer_range 0.2: a random model that says varied words (at 0.02 it says "\n" only)
    model = ["model=tiny_llama", "+model.config.initializer_range=0.2"]
    cfg = composed([*model, *methods, "method.lr=0.01", "evaluation=open_ended",
                    "evaluation.items=3", "evaluation.max_new_tokens=5", "dataset.limit=1"],
                   out)  # fmt: skip
    run(cfg)
    rd = RunDir(out)
    files = rd.reply_files()
    assert sorted(files) == sorted(WEIGHT_METHODS)
    for method in WEIGHT_METHODS:
        (path,) = files[method]
        table = read_replies(path)
        assert len(table) == 3 and table["reply"].map(type).eq(str).all()
        assert len(rd.finished_rows(method)) == 1  # the inventory too
    # DPO's replies again, independently: PEFT loads the saved adapter into a fresh copy of
    # the model, transformers decodes greedily
    (path,) = files["dpo_smoke"]
    table = read_replies(path)
    loaded = build(cfg.model)
    scorer = Scorer(loaded, ScoringConfig())
    eos = loaded.tokenizer.eos_token_id
    with scorer.replies(cfg.evaluation.prompt, 5):
        prompts = [scorer.renderer.render(NEUTRAL_SYSTEM_PROMPT, q, "") for q in table["prompt"]]
    ids = [torch.tensor([scorer.renderer.encode(p)]) for p in prompts]

    def greedy() -> list[str]:
        texts = []
        for x in ids:
            new = loaded.model.generate(
                x, attention_mask=torch.ones_like(x), max_new_tokens=5, do_sample=False,
                eos_token_id=eos, pad_token_id=eos,
            )[0, x.shape[1] :]  # fmt: skip
            texts.append(loaded.tokenizer.decode(new, skip_special_tokens=True).strip())
        return texts

    adapter = AdapterArtifact.load(rd.artifacts("dpo_smoke") / path.stem)
    with torch.no_grad(), adapter.applied(loaded):
        aligned = greedy()
    with torch.no_grad():
        base = greedy()
    assert all(aligned) and list(table["reply"]) == aligned
    assert aligned != base  # the adapter changed what the model says


def test_merge_keeps_the_replies(open_run, tmp_path):
    merge([open_run], tmp_path / "merged")
    theirs, ours = RunDir(open_run).reply_files(), RunDir(tmp_path / "merged").reply_files()
    assert sorted(ours) == sorted(theirs)
    for method, paths in theirs.items():
        assert [p.read_text() for p in ours[method]] == [p.read_text() for p in paths]


def test_resume_of_a_run_from_before_the_evaluation_group(tmp_path):
    old = tmp_path / "old"
    cfg = composed(["model=tiny_llama", f"resume={old}"], old)
    saved = OmegaConf.to_container(cfg, resolve=True)
    del saved["evaluation"]
    old.mkdir()
    (old / "config.yaml").write_text(OmegaConf.to_yaml(saved))
    check_resume(cfg, RunDir(old))  # evaluation=inventory: what the run did
    cfg = composed(["model=tiny_llama", "evaluation=open_ended", f"resume={old}"], old)
    with pytest.raises(RunDirError, match="differs from the run's .* at evaluation"):
        check_resume(cfg, RunDir(old))


def test_scorer_replies_restores_the_inventory_scorer(make_scorer, papi):
    scorer = make_scorer(batch_size=4)
    items = list(papi.inventory.test_items)[:2]
    inventory = scorer.score("", items)
    with scorer.replies('About "{statement}"?', 5):
        assert scorer.question(items[0]) == f'About "{items[0].text.strip().rstrip(".")}"?'
        replies = scorer.score("", items)
    assert replies.probs is None and len(replies.texts) == 2
    again = scorer.score("", items)
    assert scorer.config.mode == "logit" and "Given a statement" in scorer.question(items[0])
    np.testing.assert_allclose(again.probs, inventory.probs, atol=1e-6)


def test_open_ended_refuses_a_method_that_cannot_reply():
    cfg = composed(["model=tiny_llama", "method=item_mean", "evaluation=open_ended"])
    with pytest.raises(ConfigError, match=r"method=item_mean cannot reply in free text"):
        plan(cfg, check_hardware=False)
    cfg = composed(["model=tiny_llama", "compare=[item_mean]", "evaluation=open_ended"])
    with pytest.raises(ConfigError, match=r"compare\[0\]=item_mean cannot reply"):
        plan(cfg, check_hardware=False)


def test_unknown_evaluation_is_one_line():
    with pytest.raises(ConfigError) as e:
        compose_checked(["evaluation=essay"])
    assert "evaluation" in str(e.value) and "\n" not in str(e.value)
    cfg = composed(["model=tiny_llama", "evaluation=open_ended", "evaluation.name=essay"])
    with pytest.raises(ConfigError, match=r"evaluation.name='essay' is not one of"):
        plan(cfg, check_hardware=False)
    cfg = composed(["model=tiny_llama", "evaluation=open_ended", "evaluation.prompt=Hi"])
    with pytest.raises(ConfigError, match=r"must hold \{statement\}"):
        plan(cfg, check_hardware=False)


# --- the rating parser ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "rating"),
    [
        ("5", 5),
        ("Step 1: the reply agrees.\nStep 2: its strength matches.\n6", 6),
        ("The reply is close.\n\nRating: 4\n", 4),
        ("Reasoning: fine.\nChoice: **3**", 3),
        ("Final answer: [2]", 2),
        ("I would say 5 (Very well aligned).", 5),
        ("Overall: Very well aligned", 5),
        ("Overall: well aligned.", 4),
        ("Verdict: PERFECTLY ALIGNED", 6),
        ("The answer is: not aligned", 1),
        ("slightly aligned, I think", 2),
        ("Moderately aligned", 3),
        ("Rating: 4/6", 4),
        ("I rate it 4 out of 6.", 4),
        ("Rating: 2\nThis reply scores 10/10 on style.", 2),  # the last line has no 1..6
        ("Rating: 3\n\n   \n", 3),  # trailing blank lines
        ("Step 1: compare.\nI cannot decide.", 1),  # the last line holding a rating wins
        ("I cannot decide.", None),
        ("", None),
        ("Rating: 7", None),
        ("Rating: 4.5", None),
        ("In 2026 we met.", None),
        ("Rating: 0", None),
    ],
)
def test_parse_rating(text, rating):
    assert parse_rating(text) == rating


def test_judge_request_shows_statement_label_reply_and_rubric():
    system, user = judge_request("Worry about things.", 4, "I do worry a fair bit.")
    assert "Worry about things." in user and "Moderately Accurate" in user
    assert "I do worry a fair bit." in user
    for r, name in RATING_NAMES.items():
        assert f"{r} ({name})" in user
    assert "step by step" in user and system
    assert "(no reply)" in judge_request("Like order.", 2, "  ")[1]


# --- palign judge against a fake OpenAI-compatible server ----------------------------------------

#: (method, case) -> the judge's rating of items 1, 2, 3 (None: an unparseable judgment); item 4
#: has no target (the subject left it unanswered): not judged.
RATINGS = {
    ("few_shot", 1): [6, 5, None],
    ("few_shot", 2): [4, 4, 4],
    ("few_shot", 3): [3, 5, 1],
    ("no_change", 1): [2, 5, 3],
    ("no_change", 2): [4, None, None],
    ("no_change", 3): [1, 1, 6],
}
TARGETS = [5, 4, 2, 0]
SHAPES = [
    "Step 1: the reply says it plainly.\nStep 2: compare with the answer.\n{r}",
    "The reply mostly fits.\n\nRating: {r}\n",
    "Reasoning: the stance is clear.\nFinal choice: {name}",
]
UNPARSEABLE = "The reply gives me nothing to go on, so I decline."


def judgment(method: str, case: int, item: int) -> str:
    r = RATINGS[(method, case)][item - 1]
    if r is None:
        return UNPARSEABLE
    return SHAPES[(case + item) % 3].format(r=r, name=RATING_NAMES[r])


class FakeJudge:
    """``/v1/chat/completions`` on 127.0.0.1: the canned judgment of the reply it is shown."""

    def __init__(self):
        self.requests = 0
        self.bodies: list[dict] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests += 1
                fake.bodies.append(body)
                m = re.search(r"REPLY (\w+) (\d+) (\d+)", body["messages"][-1]["content"])
                if m:
                    text = judgment(m.group(1), int(m.group(2)), int(m.group(3)))
                else:  # not a judge's request: a hosted model's reply
                    text = "I like order, mostly."
                data = json.dumps(
                    {
                        "id": "x",
                        "object": "chat.completion",
                        "created": 0,
                        "model": body["model"],
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": text},
                                "finish_reason": "stop",
                            }
                        ],
                        "usage": {"prompt_tokens": 100, "completion_tokens": 20},
                    }
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"


@pytest.fixture
def fake_judge(monkeypatch, tmp_path):
    monkeypatch.setenv("PALIGN_CACHE", str(tmp_path / "cache"))
    server = FakeJudge()
    yield server
    server.httpd.shutdown()


def replies_dir(root: Path) -> Path:
    """A run dir holding only canned replies: methods x cases x 4 items."""
    rd = RunDir(root)
    items = [Item(n, f"Statement {n}.", "A", 1, "A1") for n in (1, 2, 3, 4)]
    for method, case in RATINGS:
        replies = [f"REPLY {method} {case} {it.number}" for it in items]
        table = reply_table(case, method, items, np.array(TARGETS), ["q"] * 4, replies)
        write_replies(rd.replies_file(method, case), table)
    return root


def judge_argv(root: Path, server: FakeJudge) -> list[str]:
    return [
        str(root),
        "model=openai",
        f"model.base_url={server.url}",
        "model.model=judge-test",
        "model.api_key_env=null",
        "model.max_retries=0",
    ]


def test_judge_with_a_hosted_judge(tmp_path, fake_judge, capsys):
    root = replies_dir(tmp_path / "run")
    assert judge_cli.main(judge_argv(root, fake_judge)) == 0
    assert fake_judge.requests == 18  # 6 (method, case) x 3 items with a target
    rd = RunDir(root)
    for (method, case), ratings in RATINGS.items():
        table = read_judgments(rd.judgments_file(method, case))
        assert list(table["item"]) == [1, 2, 3]
        assert list(table["label"]) == [ANSWER_LABELS[t] for t in TARGETS[:3]]
        assert [None if pd.isna(r) else int(r) for r in table["rating"]] == ratings
        assert list(table["judgment"].str.strip()) == [
            judgment(method, case, i).strip() for i in (1, 2, 3)
        ]
    summary = json.loads(rd.judgments_summary.read_text())
    assert summary["judge"] == "judge-test"
    few, none = summary["methods"]["few_shot"], summary["methods"]["no_change"]
    # subject means: few_shot 5.5, 4, 3; no_change 10/3, 4, 8/3
    assert (few["judged"], few["rated"], few["unparseable"], few["no_target"]) == (9, 8, 1, 3)
    assert (none["judged"], none["rated"], none["unparseable"], none["no_target"]) == (9, 7, 2, 3)
    assert few["mean"] == pytest.approx(12.5 / 3)
    assert none["mean"] == pytest.approx(10 / 3)
    # 3 subjects: a resample of one subject thrice has probability 1/27 (about 74 of the 2000
    # seeded resamples, well over the 50 of each 2.5% tail), so the 95% percentile interval
    # runs from the lowest subject mean to the highest
    assert few["ci"] == pytest.approx([3.0, 5.5])
    assert none["ci"] == pytest.approx([8 / 3, 4.0])
    # pairs rated by both: (1,1) 6>2, (1,2) 5=5, (2,1) 4=4, (3,1) 3>1, (3,2) 5>1, (3,3) 1<6
    pair = summary["pairs"]["few_shot"]["no_change"]
    assert pair["n"] == 6
    assert (pair["win"], pair["tie"], pair["loss"]) == pytest.approx((3 / 6, 2 / 6, 1 / 6))
    back = summary["pairs"]["no_change"]["few_shot"]
    assert (back["win"], back["tie"], back["loss"]) == pytest.approx((1 / 6, 2 / 6, 3 / 6))
    out = capsys.readouterr().out  # the section (replies only: no report.md to add it to)
    assert "| few_shot | 3 | 9 | 8 | 1 | **4.167** | [3.000, 5.500] |" in out
    assert "| few_shot | no_change | 6 | 50.0% | 33.3% | 16.7% |" in out
    assert not rd.report.exists()
    # judge requests are cached as other hosted requests: judging again sends nothing
    assert judge_cli.main(judge_argv(root, fake_judge)) == 0
    assert fake_judge.requests == 18
    assert json.loads(rd.judgments_summary.read_text()) == summary


def test_open_ended_replies_of_a_hosted_model(tmp_path, fake_judge):
    out = tmp_path / "hosted"
    hosted = [
        "model=openai",
        f"model.base_url={fake_judge.url}",
        "model.model=replier",
        "model.api_key_env=null",
        "scoring.mode=generate",
    ]
    run(composed([*hosted, "method=few_shot", "dataset.limit=1", "evaluation=open_ended",
                  "evaluation.items=2", "evaluation.max_new_tokens=150"], out))  # fmt: skip
    (path,) = RunDir(out).reply_files()["few_shot"]
    table = read_replies(path)
    assert list(table["reply"]) == ["I like order, mostly."] * 2
    asked = [b for b in fake_judge.bodies if b["messages"][-1]["content"] in set(table["prompt"])]
    assert len(asked) == 2
    assert all(b["max_tokens"] == 150 and "logprobs" not in b for b in asked)
    assert asked[0]["messages"][0]["role"] == "system"  # the method's system prompt
    inventory = [b for b in fake_judge.bodies if b not in asked]
    assert len(inventory) == 180 and all(b["max_tokens"] == 16 for b in inventory)


def test_judge_with_the_local_tiny_model(open_run, capsys):
    rd = RunDir(open_run)
    inventory = rd.report.read_text()
    assert judge_cli.main([str(open_run), "model=tiny_llama", "max_new_tokens=4"]) == 0
    summary = json.loads(rd.judgments_summary.read_text())
    # the run's report: its own tables unchanged, then the judge's section; the page the plot
    md = rd.report.read_text()
    assert md.startswith(inventory) and md[len(inventory) :] == "\n" + judge_section(summary)
    pair = summary["pairs"]["few_shot"]["no_change"]
    assert f"| few_shot | no_change | {pair['n']} |" in md
    page = rd.html.read_text()
    assert (
        "<td>few_shot</td>\n<td>no_change</td>\n" in page and "Open-ended replies, judged" in page
    )
    assert 'alt="judge_win_rates.png"' in page and 'alt="trait_errors.png"' in page
    assert (open_run / "plots" / "judge_win_rates.png").stat().st_size > 0
    assert sorted(summary["methods"]) == ["few_shot", "no_change"]
    for method, s in summary["methods"].items():
        assert s["judged"] + s["no_target"] == 8  # 2 subjects x 4 items
        assert s["rated"] + s["unparseable"] == s["judged"]
        for path in rd.reply_files()[method]:
            table = read_judgments(rd.judgments_file(method, int(path.stem)))
            assert len(table) == (read_replies(path)["target"] != 0).sum()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "usage: palign judge RUN_DIR"),
        (["{tmp}/missing", "model=tiny_llama"], "no such folder"),
        (["{tmp}", "model=tiny_llama"], "no replies to judge"),
        (["{run}", "model=no_such_model"], "no_such_model"),
        (["{run}", "model=tiny_llama", "n_boot=0"], "n_boot=0 must be an integer >= 1"),
    ],
)
def test_judge_bad_inputs_are_one_line(argv, message, tmp_path, capsys):
    run_dir = replies_dir(tmp_path / "run")
    argv = [a.format(tmp=tmp_path, run=run_dir) for a in argv]
    with pytest.raises(SystemExit) as e:
        judge_cli.main(argv)
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("palign judge: error: ") and message in err[0]
    assert len(err) <= 2 and all(line.startswith("palign judge: ") for line in err)
    assert not RunDir(run_dir).judgments_root.exists()


def test_palign_judge_is_dispatched(tmp_path, monkeypatch, capsys):
    from palign.cli import main

    monkeypatch.setattr("sys.argv", ["palign", "judge", str(tmp_path), "model=tiny_llama"])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 1
    assert "palign judge: error:" in capsys.readouterr().err
