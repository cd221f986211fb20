"""What the population methods (Personalized Soups, Prompt-MORL) share: the population they train
on, a subject's trait levels and soup weights, and the once-per-run training with its cache.

A population method trains once per run on many people (or on the inventory itself), and per
subject only combines or prompts what it trained: no per-subject training. Three rules hold:

- **No leakage.** The population is the alignment-item answers of the PAPI subjects
  (:func:`population_rows`), read through :meth:`~palign.data.papi.Subject.seen_only`, so a test
  item's answer cannot enter it: reading one raises. The exact rows trained on are written to
  ``artifacts/<method>/population/training_rows.csv`` (:data:`ROW_COLUMNS`).
- **Trained once.** What was trained (adapters in PEFT's format, their training curves, the
  rows) is kept in a cache folder keyed by the model, the method's training settings and a digest
  of the rows (:class:`PopulationStore`): the shards of one run, a resumed run and a sweep's jobs
  with the same settings load it instead of training again. The run's copy is
  ``artifacts/<method>/population/``.
- **Checked first.** An empty population, or a cache written for another model, is one error line
  before any training.

Trait levels are keyed trait means on the 1..5 scale (:func:`palign.methods.statistical.
keyed_trait_means`, as the ``trait_mean`` baseline); a subject's weight on a trait's *high*
expert is ``(level - 1) / 4`` and on its *low* expert the rest (:func:`soup_weights`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from palign import cache_root
from palign.constants import TRAITS
from palign.data.papi import Item, PapiData, Subject, keyed
from palign.errors import ArtifactError, ConfigError
from palign.rundir import write_atomic

#: Full trait names, in :data:`~palign.constants.TRAITS` order.
TRAIT_NAMES = ("Agreeableness", "Conscientiousness", "Extraversion", "Neuroticism", "Openness")
#: The columns of ``training_rows.csv``: the person (empty for a target no person gave), the
#: item's ``Full#``, the raw answer trained towards, and where the row comes from.
ROW_COLUMNS = ("case", "item", "answer", "source")
#: Soup weights: each trait's high and low weights sum to 1 (``trait``: 5 in all), or all ten
#: sum to 1 (``all``: the parameter average of Personalized Soups).
NORMALIZE = ("all", "trait")
#: Bumped when what the cache holds changes meaning.
STORE_VERSION = 1


@dataclass(frozen=True)
class TrainingRow:
    """One example a population method trains on. ``case`` is None for a target no person gave
    (an expert's extreme answer)."""

    case: int | None
    item: int
    answer: int
    source: str


def population_rows(data: PapiData, size: int | None = None, seed: int = 0) -> list[TrainingRow]:
    """The alignment-item answers of the PAPI subjects (every subject, or a seeded sample of
    ``size``), missing answers left out; source ``papi:alignment``. Each subject is read as a
    method sees it (only the alignment items visible), so no test answer can enter."""
    subjects = list(data.subjects)
    if size is not None and size < len(subjects):
        keep = np.random.default_rng(seed).choice(len(subjects), size=size, replace=False)
        subjects = [subjects[i] for i in sorted(keep)]
    train = data.inventory.train
    rows = []
    for subject in subjects:
        answers = subject.seen_only(train).answers(train)
        rows += [
            TrainingRow(subject.case, n, int(a), "papi:alignment")
            for n, a in zip(train, answers, strict=True)
            if a != 0
        ]
    if not rows:
        raise ConfigError(
            "the population has no training rows (no PAPI subject answered an alignment item); "
            "check dataset.root and method.population_size"
        )
    return rows


def extreme_answers(items: Sequence[Item], high: bool) -> np.ndarray:
    """The raw answers (n,) of someone at the top (``high``) or bottom of the items' traits:
    keyed 5 (or 1), i.e. 5 to a positively keyed item and 1 to a negatively keyed one (or the
    reverse)."""
    key = np.array([it.key for it in items])
    return keyed(np.full(len(items), 5 if high else 1), key)


def trait_levels(subject: Subject, items: Sequence[Item]) -> np.ndarray:
    """The subject's keyed trait means (5,) on ``items`` (their alignment items), 1..5."""
    from palign.methods.statistical import keyed_trait_means

    return keyed_trait_means(subject.answers([it.number for it in items]), items)


def expert_names() -> list[str]:
    """``A+``, ``A-``, ``C+``, ...: each trait's high and low expert."""
    return [f"{t}{end}" for t in TRAITS for end in "+-"]


def expert_rows(items: Sequence[Item]) -> list[TrainingRow]:
    """What the ten experts are fitted to (:func:`expert_names` order): each trait's items among
    ``items`` (the alignment items) with the extreme answers (:func:`extreme_answers`), source
    ``expert <name>``; no person's answer (``case`` None)."""
    rows = []
    for name in expert_names():
        mine = [it for it in items if it.trait == name[0]]
        targets = extreme_answers(mine, high=name[1] == "+")
        rows += [
            TrainingRow(None, it.number, int(t), f"expert {name}")
            for it, t in zip(mine, targets, strict=True)
        ]
    return rows


def soup_weights(levels: Sequence[float], normalize: str = "all") -> dict[str, float]:
    """Each expert's weight for trait levels (5,) on 1..5: ``(level - 1) / 4`` on the trait's
    high expert, the rest on its low one; divided by 5 with ``normalize="all"`` (all ten sum to
    1), as they are with ``"trait"`` (each pair sums to 1)."""
    if normalize not in NORMALIZE:
        raise ConfigError(f"method.normalize={normalize!r}: must be one of {', '.join(NORMALIZE)}")
    scale = 1 / len(TRAITS) if normalize == "all" else 1.0
    out = {}
    for t, level in zip(TRAITS, levels, strict=True):
        high = float(np.clip((float(level) - 1) / 4, 0, 1))
        out[f"{t}+"], out[f"{t}-"] = high * scale, (1 - high) * scale
    return out


def levels_text(levels: Sequence[float]) -> str:
    """``Agreeableness 3.2 of 5, Conscientiousness 4.0 of 5, ...``."""
    return ", ".join(f"{name} {level:.1f} of 5" for name, level in zip(TRAIT_NAMES, levels))


def write_rows(path: Path, rows: Sequence[TrainingRow]) -> None:
    """``rows`` as ``training_rows.csv`` (:data:`ROW_COLUMNS`), atomically."""
    import io

    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(ROW_COLUMNS)
    for r in rows:
        writer.writerow(["" if r.case is None else r.case, r.item, r.answer, r.source])
    write_atomic(path, text.getvalue())


def read_rows(path: Path) -> list[TrainingRow]:
    """The rows :func:`write_rows` wrote."""
    with open(path, newline="", encoding="utf-8") as f:
        return [
            TrainingRow(
                int(r["case"]) if r["case"] else None, int(r["item"]), int(r["answer"]), r["source"]
            )
            for r in csv.DictReader(f)
        ]


def digest(rows: Sequence[TrainingRow]) -> str:
    """sha256 of the rows as ``training_rows.csv`` holds them."""
    h = hashlib.sha256()
    for r in rows:
        h.update(f"{'' if r.case is None else r.case},{r.item},{r.answer},{r.source}\n".encode())
    return h.hexdigest()


class PopulationStore:
    """The folder of one population training (``population.json``, ``training_rows.csv``, one
    sub-folder per trained adapter): found in the cache by its key, else trained into it. ``key``
    holds what the training depends on: the method, the model (name and architecture), the
    training settings and the rows' digest."""

    INFO = "population.json"
    ROWS = "training_rows.csv"

    def __init__(self, method: str, key: dict, root: Path | None = None):
        self.method, self.key = method, {"version": STORE_VERSION, "method": method, **key}
        text = json.dumps(self.key, sort_keys=True, default=str)
        self.id = hashlib.sha256(text.encode()).hexdigest()[:16]
        self.path = (root or cache_root() / "population") / method / self.id

    def ready(self) -> bool:
        """Whether a finished training is there (``population.json`` is written last)."""
        return (self.path / self.INFO).is_file()

    def load_or_train(self, rows: Sequence[TrainingRow], train: Callable[[Path], dict]) -> dict:
        """The training's record: read from the cache when it is there, else ``train(folder)``
        writes its adapters into a fresh folder, which becomes the cache entry once done (an
        interrupted training leaves no entry). Returns ``population.json``'s content."""
        if self.ready():
            return self.info()
        work = self.path.with_name(f".{self.id}.partial")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        write_rows(work / self.ROWS, rows)
        record = train(work)
        info = {**self.key, "id": self.id, **record}
        write_atomic(work / self.INFO, json.dumps(info, indent=2, default=str))
        shutil.rmtree(self.path, ignore_errors=True)
        work.rename(self.path)
        return info

    def info(self) -> dict:
        try:
            return json.loads((self.path / self.INFO).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ArtifactError(f"{self.path / self.INFO}: unreadable ({e})") from None

    def copy_to(self, folder: Path | None) -> None:
        """The entry as the run's ``artifacts/<method>/population/`` (replaced if there)."""
        if folder is None:
            return
        if folder.exists():
            shutil.rmtree(folder)
        shutil.copytree(self.path, folder)


def curves(folder: Path) -> dict[str, list[dict[str, float]]]:
    """The training curve (``train_history.json``) of each adapter a population folder holds,
    by its folder's name (``A+``, ..., or ``adapter``)."""
    return {
        history.parent.name: json.loads(history.read_text(encoding="utf-8"))
        for history in sorted(Path(folder).glob("**/train_history.json"))
    }


def trained_once(
    method: str,
    loaded,
    key: dict,
    rows: Sequence[TrainingRow],
    train: Callable[[Path], dict],
    run_folder: Path | None,
) -> tuple[dict, Path]:
    """What ``method`` trains on ``rows`` for the ``loaded`` model, once: from the cache entry
    keyed by the model (:func:`model_key`), ``key`` (the training settings, ...) and the rows'
    digest, else ``train(folder)`` into it; copied to the run's ``run_folder``. Returns
    ``population.json``'s content and the cache entry's folder."""
    store = PopulationStore(method, {"model": model_key(loaded), **key, "rows": digest(rows)})
    info = store.load_or_train(rows, train)
    store.copy_to(run_folder)
    return info, store.path


def check_store(path: Path | str, model: str) -> dict:
    """The ``population.json`` of a population folder given by the user (``method.
    population_from``), checked: it exists, and it was trained on ``model``."""
    info_path = Path(path) / PopulationStore.INFO
    if not info_path.is_file():
        raise ConfigError(
            f"method.population_from={path}: no {PopulationStore.INFO} there (expected an "
            "artifacts/<method>/population/ folder of an earlier run)"
        )
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ArtifactError(f"{info_path}: not JSON ({e})") from None
    if info.get("model", {}).get("name") != model:
        raise ConfigError(
            f"method.population_from={path}: trained on model "
            f"{info.get('model', {}).get('name')!r}, not {model!r} ({info_path})"
        )
    return info


def model_key(loaded) -> dict:
    """What identifies the loaded model for the cache: its name, where it came from and its
    architecture (the weights of a named model do not change under the name)."""
    config = loaded.model.config
    return {
        "name": loaded.name,
        "source": getattr(config, "_name_or_path", None),
        "architecture": hashlib.sha256(config.to_json_string().encode()).hexdigest()[:16],
        "dtype": str(next(loaded.model.parameters()).dtype),
    }
