"""The ready-made launcher scripts: one node running shards in parallel (on CPU here, the
"GPUs" being two processes) then merging them, and the SLURM array submission (dry run: no
SLURM on the test machine). Then what every launcher passes on: an output path and overrides
holding spaces, `;`, `$(...)`, backticks, quotes, `*`, `&`, `>` and a newline reach the program
(or the command SLURM would run) as exactly those strings, and nothing in them is executed; and
missing or invalid arguments fail in one line. The scheduler and the Python the launchers call
are stand-ins that record their arguments (`sbatch` only submits; the scripts are under test)."""

import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from conftest import wait_for_rows

ROOT = Path(__file__).resolve().parents[1]


def _run(name: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(ROOT / "launchers" / name), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        env={**os.environ, "PY": sys.executable, **env},
    )


def _script(name: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    done = _run(name, *args, **env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


# A shard dir goes into Hydra overrides (hydra.run.dir=..., resume=...) as well as being a path:
# this name holds what Hydra's override grammar and a shell both treat specially.
HOSTILE_NODE_DIR = "node dir; 'q' \"dq\" $(touch pwned) `touch pwned` a,b * [c] {d} \\ é 50%"


def test_multi_gpu_node_runs_shards_in_parallel_merges_and_resumes_in_a_hostile_out_dir(tmp_path):
    """The real program (Hydra's override grammar, the run, the merge) gets the dir exactly; the
    same command again resumes every shard (resume=<the quoted dir>)."""
    out = tmp_path / HOSTILE_NODE_DIR
    args = [str(out), "model=tiny_llama", "method=no_change", "dataset.limit=3"]
    _script("multi_gpu_node.sh", *args, PALIGN_GPUS="2")
    shards = [json.loads((out / "shards" / i / "summary.json").read_text()) for i in "01"]
    merged = json.loads((out / "merged" / "summary.json").read_text())
    assert [s["shard"] for s in shards] == ["0/2", "1/2"]
    assert sorted(merged["cases"]) == sorted(shards[0]["cases"] + shards[1]["cases"])
    assert merged["n_subjects"] == 3 and merged["merged_from"] == [
        str(out / "shards" / i) for i in "01"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == [HOSTILE_NODE_DIR]  # nothing else made
    assert not (ROOT / "pwned").exists()
    # The same command again resumes every shard: nothing is evaluated twice.
    again = _run("multi_gpu_node.sh", *args, PALIGN_GPUS="2")
    logs = [(out / "logs" / f"shard-{i}.log").read_text() for i in "01"]
    assert again.returncode == 0, again.stderr + logs[0][-2000:]
    assert "2 finished subject(s) found" in logs[0] and "1 finished subject(s) found" in logs[1]
    assert json.loads((out / "merged" / "summary.json").read_text())["score"] == merged["score"]
    assert not (ROOT / "pwned").exists()


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
    # SLURM signals the batch shell 600 s before the time limit; the command execs shard_job.sh,
    # so that the batch shell is the script that stops the run and requeues the task.
    assert "--signal=B:USR1@600" in array and "exec\\ launchers/shard_job.sh" in array
    assert merge.startswith("sbatch --dependency=afterok:") and "palign.runs.merge" in merge


# --- what the launchers pass on -----------------------------------------------------------

FAKE_SBATCH = """#!/usr/bin/env bash
# Stand-in for sbatch: records its working dir and arguments, prints a job id (--parsable).
n=$(find "$LAUNCHER_RECORD" -name 'sbatch-*' | wc -l)
printf '%s\\0' "$PWD" "$@" > "$LAUNCHER_RECORD/sbatch-$n"
echo $((1000 + n))
"""

FAKE_PYTHON = """#!/usr/bin/env bash
# Stand-in for the Python the launchers run: records its arguments.
printf '%s\\0' "$@" > "$(mktemp "$LAUNCHER_RECORD/py-XXXXXX")"
"""


class Hostile:
    """An output path and overrides that would run `touch <tmp>/pwned-*` if a launcher or the
    shell running its command split or evaluated them, and stand-ins for sbatch and Python."""

    def __init__(self, tmp: Path, backslash: bool = True):
        self.tmp = tmp
        pwn = tmp / "pwned"
        name = f"out dir; touch {pwn}-1 && touch {pwn}-2 > {pwn}-3 & $(touch {pwn}-4) "
        name += f"`touch {pwn}-5` 'sq' \"dq\" * ? [ab] {{c,d}} ~ 50%a #"
        self.out = tmp / "outs" / (name + (" \\ \\' end\\" if backslash else ""))
        self.overrides = [
            "model=tiny llama",
            f"a=1; touch {pwn}-o1",
            f"b=$(touch {pwn}-o2)",
            f"c=`touch {pwn}-o3`",
            "d='single' \"double\"",
            "e=*",
            f"f=x\ntouch {pwn}-o4",
            f"g=| touch {pwn}-o5",
        ]
        self.record = tmp / "record"
        self.record.mkdir()
        fakes = tmp / "bin dir; $(touch pwned) 'q'"  # the Python's path is passed on too
        fakes.mkdir()
        (fakes / "sbatch").write_text(FAKE_SBATCH)
        self.python = fakes / "python"
        self.python.write_text(FAKE_PYTHON)
        for f in (fakes / "sbatch", self.python):
            f.chmod(0o755)
        self.env = {
            "PATH": f"{fakes}{os.pathsep}{os.environ['PATH']}",
            "PY": str(self.python),
            "LAUNCHER_RECORD": str(self.record),
        }

    def calls(self, prefix: str) -> list[list[str]]:
        """The recorded argument lists of `prefix` (sbatch: in call order) and forget them."""
        files = sorted(self.record.glob(f"{prefix}-*"))
        calls = [f.read_bytes().decode().split("\0")[:-1] for f in files]
        for f in files:
            f.unlink()
        return calls

    def assert_nothing_ran(self):
        assert sorted(p.name for p in self.tmp.iterdir() if p.name.startswith("pwned")) == []
        assert not (ROOT / "pwned").exists()


def _hydra_value(override: str, key: str) -> str:
    """The value Hydra's command-line grammar reads from `override` (asserting its key)."""
    parsed = OverridesParser.create().parse_override(override)
    assert parsed.key_or_group == key, override
    return parsed.value()


def _shard_argv(argv: list[str], overrides: list[str], shard: str, run_dir: Path, resume=False):
    """`argv` is `python -m palign <overrides> dataset.shard=<shard> hydra.run.dir=<run_dir>`
    (and `resume=<run_dir>`), each value exactly as given."""
    head, rest = argv[: 2 + len(overrides)], argv[2 + len(overrides) :]
    assert head == ["-m", "palign", *overrides]
    assert len(rest) == 2 + resume and rest[0] == f"dataset.shard={shard}", rest
    assert _hydra_value(rest[1], "hydra.run.dir") == str(run_dir)
    if resume:
        assert _hydra_value(rest[2], "resume") == str(run_dir)


def test_shard_job_passes_a_hostile_out_dir_and_overrides_on_verbatim(tmp_path):
    h = Hostile(tmp_path)
    _script("shard_job.sh", str(h.out), "2", "3", *h.overrides, **h.env)
    (argv,) = h.calls("py")
    _shard_argv(argv, h.overrides, "2/3", h.out / "shards" / "2")
    # A shard dir that holds a run is resumed: resume=<that dir>, read back exactly by Hydra.
    (h.out / "shards" / "2").mkdir(parents=True)
    (h.out / "shards" / "2" / "config.yaml").write_text("{}\n")
    _script("shard_job.sh", str(h.out), "2", "3", *h.overrides, **h.env)
    (argv,) = h.calls("py")
    _shard_argv(argv, h.overrides, "2/3", h.out / "shards" / "2", resume=True)
    h.assert_nothing_ran()


def test_multi_gpu_node_passes_a_hostile_out_dir_and_overrides_on_verbatim(tmp_path):
    h = Hostile(tmp_path)
    for i in "01":  # what the shard runs would leave, for the merge's glob
        (h.out / "shards" / i).mkdir(parents=True)
    _script("multi_gpu_node.sh", str(h.out), *h.overrides, PALIGN_GPUS="2", **h.env)
    calls = h.calls("py")
    merges = [c for c in calls if c[:2] == ["-m", "palign.runs.merge"]]
    shards = sorted((c for c in calls if c not in merges), key=lambda c: c[-2])
    assert len(merges) == 1 and len(shards) == 2
    for i, argv in enumerate(shards):
        _shard_argv(argv, h.overrides, f"{i}/2", h.out / "shards" / str(i))
        assert (h.out / "logs" / f"shard-{i}.log").is_file()
    assert merges[0] == ["-m", "palign.runs.merge", "--out", f"{h.out}/merged"] + [
        f"{h.out}/shards/{i}" for i in "01"
    ]
    h.assert_nothing_ran()


def _sbatch_job(shell: str, sbatch_argv: list[str], h: Hostile, **env: str) -> None:
    """Run the job of a recorded sbatch call as SLURM does: the --wrap command in a script
    `#!/bin/sh ... <command>` (what sbatch writes), in the submission's working dir, with the
    job's environment (no PY: the command brings its own)."""
    (wrap,) = [a.removeprefix("--wrap=") for a in sbatch_argv if a.startswith("--wrap=")]
    script = h.tmp / "job.sh"
    script.write_text(f"#!/bin/sh\n# This script was created by sbatch --wrap.\n\n{wrap}\n")
    job_env = {k: v for k, v in os.environ.items() if k != "PY"}
    job_env.update(PATH=h.env["PATH"], LAUNCHER_RECORD=h.env["LAUNCHER_RECORD"], **env)
    cwd = sbatch_argv[0]
    done = subprocess.run(
        [shell, str(script)], cwd=cwd, env=job_env, capture_output=True, text=True, timeout=60
    )
    h.assert_nothing_ran()
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("shell", ["sh", "bash"])  # sbatch's #!/bin/sh (dash here), and bash
def test_slurm_shards_jobs_get_a_hostile_out_dir_and_overrides_verbatim(tmp_path, shell):
    h = Hostile(tmp_path, backslash=False)  # a backslash is refused (see the refusals below)
    done = _script("slurm_shards.sh", str(h.out), "3", *h.overrides, **h.env)
    assert done.stdout.strip().endswith(f"array job 1000 (0-2), merge: job 1001 -> {h.out}/merged")
    array, merge = h.calls("sbatch")
    assert array[0] == str(ROOT) and merge[0] == str(ROOT)  # jobs run where sbatch was called
    # Array task 1 runs shard_job.sh, which runs the Python with every value as given.
    _sbatch_job(shell, array, h, SLURM_ARRAY_TASK_ID="1")
    (argv,) = h.calls("py")
    _shard_argv(argv, h.overrides, "1/3", h.out / "shards" / "1")
    # The merge job globs the shard dirs (the * of the out dir's name stays a character).
    for i in "012":
        (h.out / "shards" / i).mkdir(parents=True)
    # What the name's * ? [ab] would match as a pattern: a glob would pick its shard up too.
    decoy = h.out.name.replace("*", "Z").replace("?", "Q").replace("[ab]", "a")
    (h.out.parent / decoy / "shards" / "0").mkdir(parents=True)
    _sbatch_job(shell, merge, h)
    (argv,) = h.calls("py")
    assert argv == ["-m", "palign.runs.merge", "--out", f"{h.out}/merged"] + [
        f"{h.out}/shards/{i}" for i in "012"
    ]
    # The options: sbatch reads % patterns in the log names (%% is a literal %).
    logs = str(h.out).replace("%", "%%") + "/logs"
    assert f"--output={logs}/shard-%a.out" in array and "--array=0-2" in array
    assert f"--output={logs}/merge.out" in merge and "--dependency=afterok:1000" in merge
    assert (h.out / "logs").is_dir()
    h.assert_nothing_ran()


def test_slurm_shards_dry_run_prints_what_it_submits_and_no_empty_override(tmp_path):
    h = Hostile(tmp_path, backslash=False)
    for args in ([str(h.out), "2", *h.overrides], [str(h.out), "2"]):
        printed = _script("slurm_shards.sh", "--dry-run", *args, **h.env).stdout
        assert h.calls("sbatch") == []  # a dry run submits nothing
        _script("slurm_shards.sh", *args, **h.env)
        submitted = h.calls("sbatch")
        # The printed lines, run by bash (array job id filled in), make the same sbatch calls.
        lines = printed.replace("<array job id>", "1000").splitlines()
        assert len(lines) == 2
        for line in lines:
            subprocess.run(
                ["bash", "-c", line],
                cwd=ROOT,
                env={**os.environ, **h.env},
                check=True,
                capture_output=True,
                timeout=60,
            )
        array, merge = submitted  # the printed merge line leaves out --parsable
        assert h.calls("sbatch") == [array, [a for a in merge if a != "--parsable"]]
    # Without overrides the shard command passes none (not an empty one).
    (wrap,) = [a for a in array if a.startswith("--wrap=")]
    assert wrap.endswith('"$SLURM_ARRAY_TASK_ID" 2'), wrap
    h.assert_nothing_ran()


@pytest.mark.parametrize(
    ("name", "args", "fixed"),
    [
        (
            "local_sweep.sh",
            ["tiny_llama", "2"],
            ["method=no_change,few_shot,personality_prompt", "model=tiny_llama", "dataset.limit=2"],
        ),
        (
            "slurm_sweep.sh",
            ["llama3_8b"],
            [
                "hydra/launcher=slurm",
                "hardware=gpu",
                "model=llama3_8b",
                "method=no_change,few_shot,personality_prompt,pas,dpo,ppo",
            ],
        ),
    ],
)
def test_sweeps_pass_hostile_overrides_on_verbatim(tmp_path, name, args, fixed):
    h = Hostile(tmp_path)
    _script(name, *args, *h.overrides, **h.env)
    assert h.calls("py") == [["-m", "palign", "-m", *fixed, *h.overrides]]
    h.assert_nothing_ran()


# Missing or invalid arguments: exit status 2, one line on stderr naming the script, the problem
# and the usage; nothing submitted or run. Values with `{pwn}` would run `touch` if evaluated
# (bash evaluates a variable's text in arithmetic: x[$(cmd)] runs cmd).
REFUSED = [
    ("shard_job.sh", [], {}, "missing arguments: OUT_DIR, SHARD and N_SHARDS are needed, got 0"),
    ("shard_job.sh", ["{o}", "1"], {}, "missing arguments"),
    ("shard_job.sh", ["{o}", "3", "3"], {}, "SHARD must be an integer from 0 to 2, got 3"),
    ("shard_job.sh", ["{o}", "x[$(touch {pwn})]", "3"], {}, "SHARD must be an integer"),
    ("shard_job.sh", ["{o}", "0", "HOME[$(touch {pwn})]"], {}, "N_SHARDS must be a positive"),
    ("shard_job.sh", ["", "0", "1"], {}, "OUT_DIR is empty"),
    ("shard_job.sh", ["{o}/${{x}}", "0", "1"], {}, "OUT_DIR must not contain '${'"),
    ("multi_gpu_node.sh", [], {}, "missing OUT_DIR"),
    ("multi_gpu_node.sh", ["{o}"], {"PALIGN_GPUS": "HOME[$(touch {pwn})]"}, "PALIGN_GPUS must"),
    ("multi_gpu_node.sh", ["{o}"], {"PALIGN_GPUS": "0"}, "PALIGN_GPUS must be a positive"),
    ("multi_gpu_node.sh", ["--dry-run", "{o}"], {"PALIGN_GPUS": "2"}, "unknown option --dry-run"),
    ("slurm_shards.sh", [], {}, "missing arguments: OUT_DIR and N_SHARDS are needed, got 0"),
    ("slurm_shards.sh", ["--dry-run", "{o}"], {}, "missing arguments"),
    ("slurm_shards.sh", ["{o}", "0"], {}, "N_SHARDS must be a positive integer, got 0"),
    ("slurm_shards.sh", ["{o}", "HOME[$(touch {pwn})]"], {}, "N_SHARDS must be a positive"),
    ("slurm_shards.sh", ["--dryrun", "{o}", "2"], {}, "unknown option --dryrun"),
    ("slurm_shards.sh", ["{o}/a\\b", "2"], {}, "OUT_DIR must not contain a backslash"),
    ("local_sweep.sh", ["hardware=cpu"], {}, "MODEL must be a model config name"),
    ("local_sweep.sh", ["tiny_llama", "HOME[$(touch {pwn})]"], {}, "N_SUBJECTS must be"),
    ("slurm_sweep.sh", ["method=pas"], {}, "MODEL must be a model config name"),
    ("slurm_sweep.sh", ["$(touch {pwn})"], {}, "MODEL must be a model config name"),
]


@pytest.mark.parametrize(("name", "args", "env", "message"), REFUSED)
def test_launchers_refuse_missing_or_invalid_arguments_in_one_line(
    tmp_path, name, args, env, message
):
    h = Hostile(tmp_path)
    fill = {"o": str(tmp_path / "o"), "pwn": str(tmp_path / "pwned")}
    env = {k: v.format(**fill) for k, v in env.items()}
    done = _run(name, *(a.format(**fill) for a in args), **{**h.env, **env})
    assert done.returncode == 2 and done.stdout == "", done.stdout + done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(f"{name}: "), done.stderr
    assert message in done.stderr and f"(usage: launchers/{name} " in done.stderr, done.stderr
    assert h.calls("sbatch") == [] and h.calls("py") == []
    assert not (tmp_path / "o").exists()
    h.assert_nothing_ran()


def test_usage_lines_match_the_scripts_headers():
    """The usage a refusal prints is the one each script documents in its header."""
    for script in sorted((ROOT / "launchers").glob("[!_]*.sh")):
        text = script.read_text()
        (usage,) = [ln.split("'")[1] for ln in text.splitlines() if ln.startswith("USAGE=")]
        assert f"#   {usage}\n" in text, script.name
        assert shlex.split(usage)[0] == f"launchers/{script.name}"


QUOTED = [
    "plain/path",
    "/abs/my dir/shards/0",
    " lead/trail ",
    "it's",
    "a,b",
    "x;$(touch pwned)`touch pwned`|&>",
    "\\",
    "a\\'b\\",
    "\\\\'",
    "'",
    '"',
    "*?[ab]{c,d}~#",
    "1/2",
    "null",
    "tab\there",
    "new\nline",
    "données/é",
    "",
]


@pytest.mark.parametrize("value", QUOTED)
def test_quoting_helpers_give_back_every_value_exactly(value):
    """sh_word: one word of `sh` (dash here, sbatch's /bin/sh) and of bash; hydra_value: the
    value Hydra's override grammar reads."""
    quote = 'source launchers/_common.sh; printf "%s\\0" "$(sh_word "$1")" "$(hydra_value "$1")"'
    word, hydra = (
        subprocess.run(
            ["bash", "-c", quote, "quote", value], cwd=ROOT, capture_output=True, check=True
        )
        .stdout.decode()
        .split("\0")[:-1]
    )
    for shell in ("sh", "bash"):
        back = subprocess.run(
            [shell, "-c", f"printf '%s' {word}"], cwd=ROOT, capture_output=True, check=True
        ).stdout.decode()
        assert back == value, (shell, word)
    assert _hydra_value(f"key={hydra}", "key") == value, hydra
    assert not (ROOT / "pwned").exists()


def test_a_shard_stopped_before_its_time_limit_requeues_its_task_and_resumes(tmp_path):
    """SLURM sends the batch shell (shard_job.sh, which the array task's command execs) SIGUSR1
    PALIGN_SLURM_STOP_S before the time limit: the real run stops at its next safe point,
    shard_job.sh requeues the array task with `scontrol requeue` (a stand-in that records its
    arguments) and exits 143; the task's next start (the same script again) resumes the shard
    and evaluates only the subjects not done."""
    out, fakes = tmp_path / "out", tmp_path / "bin"
    fakes.mkdir()
    record = tmp_path / "scontrol.args"
    (fakes / "scontrol").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" >> "{record}"\n')
    (fakes / "scontrol").chmod(0o755)
    env = {
        **os.environ,
        "PY": sys.executable,
        "PATH": f"{fakes}{os.pathsep}{os.environ['PATH']}",
        "SLURM_JOB_ID": "1002",
        "SLURM_ARRAY_JOB_ID": "1000",
        "SLURM_ARRAY_TASK_ID": "1",
    }
    command = [str(ROOT / "launchers" / "shard_job.sh"), str(out), "1", "2"]
    command += ["model=tiny_llama", "hardware=cpu", "method=no_change", "dataset.limit=40"]
    proc = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    rows = out / "shards" / "1" / "results" / "no_change"
    wait_for_rows(rows, proc)
    proc.send_signal(signal.SIGUSR1)  # to the script only, as SLURM's --signal=B:USR1
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    done = len(list(rows.glob("*.json")))
    assert 0 < done < 20
    assert f"palign: stopped by SIGTERM after {done} of 20 subjects; continue with:" in err
    assert "shard_job.sh: shard 1 stopped before the time limit; requeueing job 1000_1" in err
    assert record.read_text().split() == ["requeue", "1000_1"]
    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    shard = out / "shards" / "1"
    assert list((shard / ".hydra").glob("resume_*")), "the next start did not resume"
    assert f"{done} finished subject(s) found" in again.stdout + again.stderr
    summary = json.loads((shard / "summary.json").read_text())
    assert summary["n_subjects"] == 20 and len(list(rows.glob("*.json"))) == 20
    assert record.read_text().split() == ["requeue", "1000_1"]  # not requeued again
