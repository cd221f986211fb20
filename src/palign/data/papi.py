"""Loading the PAPI files (upstream layout) into typed, validated arrays.

Answers are kept in *raw* coding everywhere after loading: the number (1..5, 0 = missing) of the
option the person would pick for the item as printed. The files store answers to negatively
keyed items already reverse-scored; ``coding="keyed"`` undoes that (raw = 6 - v for key -1,
v != 0), ``coding="as_stored"`` takes the stored values as raw, as the paper's reference code does.
"""

from __future__ import annotations

import io
import json
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from palign import cache_root
from palign.errors import ConfigError, DataError

N_ITEMS = 300
CODINGS = ("keyed", "as_stored")
REQUIRED_FILES = ("Test-set.json", "mpi_300_split.json", "IPIP-NEO-ItemKey.xls")
SPLIT_FIELDS = ("train_index", "test_index")
#: The item key's columns palign reads.
ITEM_KEY_COLUMNS = ("Full#", "Sign", "Facet", "Item")
PERSONA_FILE = "personality_prompt.json"
WHERE_TO_GET = (
    "Download them with `palign data fetch` (into $PALIGN_DATA when set, else palign's cache; "
    "palign finds them there), or "
    "get them from the PAPI/ folder of the public repository zhu-minjun/PAlign (the full set is "
    "WestlakeNLP/PAPI-300K on the Hugging Face hub) and point dataset.root or $PALIGN_DATA at "
    "the folder, or place it at ./data/papi"
)
_SIGN = re.compile(r"^([+-])([ACENO])(\d+)$")


class PapiDataError(DataError):
    """A PAPI file is missing or malformed; the message names the file and the record."""


class HiddenAnswerError(LookupError):
    """A method asked for a subject's answer it must not see (a test item)."""


@dataclass(frozen=True)
class Item:
    """One IPIP-NEO-300 item. ``number`` is its ``Full#`` (the N of ``iN``)."""

    number: int
    text: str
    trait: str
    key: int
    facet: str


@dataclass(frozen=True)
class Inventory:
    """The 300 items (indexed by ``Full#``) and the alignment/test split."""

    items: dict[int, Item]
    train: tuple[int, ...]
    test: tuple[int, ...]

    def select(self, numbers: Iterable[int]) -> list[Item]:
        return [self.items[n] for n in numbers]

    @property
    def train_items(self) -> list[Item]:
        return self.select(self.train)

    @property
    def test_items(self) -> list[Item]:
        return self.select(self.test)


@dataclass
class Subject:
    """One person: ``raw[n - 1]`` is the raw answer (1..5, 0 = missing) to item ``Full# n``."""

    case: int
    index: int
    raw: np.ndarray
    persona: str | None = field(default=None, repr=False)
    #: Item numbers whose answers may be read (None: all); see :meth:`seen_only`.
    visible: frozenset[int] | None = field(default=None, repr=False)

    def answers(self, numbers: Sequence[int]) -> np.ndarray:
        """Raw answers to the given items, shape (len(numbers),), int64. Raises
        :class:`HiddenAnswerError` for an item outside :attr:`visible`."""
        numbers = np.asarray(numbers, dtype=np.int64)
        if self.visible is not None:
            hidden = [int(n) for n in numbers if int(n) not in self.visible]
            if hidden:
                raise HiddenAnswerError(
                    f"case {self.case}: the answers to item(s) {hidden[:5]} are hidden from the "
                    "method (only the alignment items are visible to it)"
                )
        return self.raw[numbers - 1].astype(np.int64)

    def seen_only(self, numbers: Iterable[int]) -> Subject:
        """This subject as a method sees it: only the answers to ``numbers`` can be read."""
        return replace(self, visible=frozenset(int(n) for n in numbers))


@dataclass
class PapiData:
    """Everything loaded from one PAPI directory. ``answers`` is (n_subjects, 300), raw coding."""

    root: Path
    coding: str
    inventory: Inventory
    subjects: list[Subject]

    @property
    def answers(self) -> np.ndarray:
        return np.stack([s.raw for s in self.subjects])


def _project_root() -> Path:
    return Path(__file__).resolve().parents[3]


def locate_papi(root: str | os.PathLike | None = None) -> Path:
    """Find the PAPI directory: ``root``, ``$PALIGN_DATA``, ``./data/papi``, ``../shared/papi``,
    then ``<cache>/papi`` (where ``palign data fetch`` downloads them).

    The two relative locations are tried from the working directory, then from the project root.
    """
    if root:
        path = Path(root).expanduser()
        _require_files(path, f"dataset.root={root}")
        return path
    env = os.environ.get("PALIGN_DATA")
    if env:
        path = Path(env).expanduser()
        _require_files(path, f"$PALIGN_DATA={env}")
        return path
    tried = []
    candidates = [
        (base / rel).resolve()
        for base in dict.fromkeys([Path.cwd(), _project_root()])
        for rel in ("data/papi", "../shared/papi")
    ]
    for path in [
        *candidates,
        cache_root() / "papi",
    ]:  # the last: where `palign data fetch` puts them
        tried.append(str(path))
        if all((path / f).is_file() for f in REQUIRED_FILES):
            return path
    raise PapiDataError(
        f"PAPI data not found (looked in dataset.root, $PALIGN_DATA, {', '.join(tried)}). "
        + WHERE_TO_GET
    )


def _require_files(path: Path, source: str) -> None:
    missing = [f for f in REQUIRED_FILES if not (path / f).is_file()]
    if missing:
        raise PapiDataError(f"{source}: {path} lacks {', '.join(missing)}. " + WHERE_TO_GET)


def _short(value: object, width: int = 40) -> str:
    """``repr(value)`` on one line, cut to about ``width`` characters, for error messages."""
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _is_int(value: object) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _read_json(path: Path):
    """Parse a UTF-8 JSON file (a leading byte-order mark is allowed); errors name the file."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise PapiDataError(
            f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})"
        ) from e
    except OSError as e:
        raise PapiDataError(f"{path}: cannot be read: {e.strerror or e}") from e
    if not text.strip():
        raise PapiDataError(f"{path}: the file is empty (expected JSON)")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise PapiDataError(
            f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}"
        ) from e


def load_item_key(path: Path) -> dict[int, Item]:
    """Read ``IPIP-NEO-ItemKey.xls`` into ``{Full#: Item}`` (rows are not in ``Full#`` order)."""
    import pandas as pd
    import xlrd

    try:
        # xlrd's own warnings about a damaged file would go to stdout: the error says it instead
        book = xlrd.open_workbook(path, logfile=io.StringIO())
        with warnings.catch_warnings():  # pandas 3 flags its xlrd engine as deprecated
            warnings.simplefilter("ignore")
            frame = pd.read_excel(book, engine="xlrd")
    except Exception as e:  # xlrd raises several unrelated types for a broken file
        reason = " ".join(str(e).split()) or type(e).__name__
        raise PapiDataError(f"{path}: cannot read the item key: {reason}") from e
    missing = [c for c in ITEM_KEY_COLUMNS if c not in frame.columns]
    if missing:
        raise PapiDataError(
            f"{path}: item key lacks column(s) {', '.join(missing)} "
            f"(found {', '.join(map(str, frame.columns)) or 'none'})"
        )
    items: dict[int, Item] = {}
    for row_no, row in enumerate(frame.itertuples(index=False), start=2):
        number, sign, facet, text = (
            row[frame.columns.get_loc("Full#")],
            *(row[frame.columns.get_loc(c)] for c in ("Sign", "Facet", "Item")),
        )
        where = f"{path}: row {row_no} (Full#={number})"
        match = _SIGN.match(sign.strip()) if isinstance(sign, str) else None
        if match is None:
            raise PapiDataError(f"{where}: Sign {sign!r} is not like '+A1' or '-N3'")
        if not isinstance(text, str) or not text.strip():
            raise PapiDataError(f"{where}: empty Item text")
        if isinstance(number, str):
            number = number.strip()
            number = int(number) if number.isdigit() else number
        if isinstance(number, (float, np.floating)) and float(number).is_integer():
            number = int(number)
        if not _is_int(number) or not 1 <= number <= N_ITEMS:
            raise PapiDataError(f"{where}: Full# is not an item number in 1..{N_ITEMS}")
        number = int(number)
        if number in items:
            raise PapiDataError(f"{where}: duplicate Full# {number}")
        items[number] = Item(
            number=number,
            text=text.strip(),
            trait=match.group(2),
            key=1 if match.group(1) == "+" else -1,
            facet=str(facet).strip(),
        )
    if sorted(items) != list(range(1, N_ITEMS + 1)):
        absent = sorted(set(range(1, N_ITEMS + 1)) - set(items))
        raise PapiDataError(f"{path}: item key lacks Full# {absent[:10]}")
    return items


def load_split(path: Path, items: dict[int, Item]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Read ``mpi_300_split.json``: the alignment (train) and test item numbers."""
    data = _read_json(path)
    if not isinstance(data, dict):
        raise PapiDataError(
            f"{path}: expected a JSON object with fields {', '.join(SPLIT_FIELDS)}, "
            f"got a {type(data).__name__}"
        )
    parts = []
    for name in SPLIT_FIELDS:
        if name not in data:
            raise PapiDataError(f"{path}: missing field {name!r}")
        values = data[name]
        if not isinstance(values, list) or not values:
            raise PapiDataError(
                f"{path}: field {name!r} = {_short(values)} is not a non-empty list of item ids"
            )
        for pos, v in enumerate(values):
            if not _is_int(v) or v not in items:
                raise PapiDataError(
                    f"{path}: {name}[{pos}] = {_short(v)} is not an item id (1..{N_ITEMS})"
                )
        if len(set(values)) != len(values):
            twice = next(v for i, v in enumerate(values) if v in values[:i])
            raise PapiDataError(f"{path}: {name} lists item {twice} twice")
        parts.append(tuple(int(v) for v in values))
    overlap = set(parts[0]) & set(parts[1])
    if overlap:
        raise PapiDataError(f"{path}: items {sorted(overlap)[:10]} are in both train and test")
    return parts[0], parts[1]


def load_subjects(path: Path, items: dict[int, Item], coding: str) -> list[Subject]:
    """Read ``Test-set.json`` and convert every record to raw coding."""
    records = _read_json(path)
    if not isinstance(records, list):
        raise PapiDataError(
            f"{path}: expected a JSON list of subject records, got a {type(records).__name__}"
        )
    if not records:
        raise PapiDataError(f"{path}: the list of subject records is empty")
    key = np.array([items[n].key for n in range(1, N_ITEMS + 1)])
    fields = [f"i{n}" for n in range(1, N_ITEMS + 1)]
    subjects, seen = [], {}
    for index, record in enumerate(records):
        where = f"{path}: record {index}"
        if not isinstance(record, dict):
            raise PapiDataError(f"{where}: expected a JSON object, got {_short(record)}")
        if "case" not in record:
            raise PapiDataError(f"{where}: missing field 'case'")
        case = record["case"]
        if not _is_int(case):
            raise PapiDataError(f"{where}: field 'case' = {_short(case)} is not an integer id")
        where += f" (case {case})"
        if case in seen:
            raise PapiDataError(f"{where}: duplicate case, first seen at record {seen[case]}")
        seen[case] = index
        values = [record.get(name) for name in fields]
        if not all(type(v) is int and 0 <= v <= 5 for v in values):  # bool excluded
            for name, value in zip(fields, values):
                if value is None:
                    what = "missing item field" if name not in record else "null item field"
                    raise PapiDataError(f"{where}: {what} {name!r}")
                if type(value) is not int or not 0 <= value <= 5:
                    raise PapiDataError(
                        f"{where}: field {name!r} = {_short(value)} is not an answer in 0..5"
                    )
        stored = np.array(values, dtype=np.int64)
        subjects.append(Subject(case=int(case), index=index, raw=to_raw(stored, key, coding)))
    return subjects


def to_raw(stored: np.ndarray, key: np.ndarray, coding: str) -> np.ndarray:
    """Stored values -> raw answers; ``key`` holds each item's +1/-1 (same shape)."""
    if coding == "as_stored":
        return stored.copy()
    if coding == "keyed":
        return keyed(stored, key)  # reverse-scoring is its own inverse
    raise _coding_error(coding)


def _coding_error(coding: object) -> ConfigError:
    return ConfigError(
        f"protocol.coding={_short(coding)}: must be one of {', '.join(CODINGS)} "
        "(protocol=clean uses keyed, protocol=paper as_stored)"
    )


def load_personas(path: Path, n_subjects: int) -> list[str]:
    """The P^2 texts (``output[0]`` of each entry), index-aligned with ``Test-set.json``."""
    entries = _read_json(path)
    if not isinstance(entries, list) or len(entries) != n_subjects:
        got = len(entries) if isinstance(entries, list) else type(entries).__name__
        raise PapiDataError(f"{path}: expected a list of {n_subjects} entries, got {got}")
    texts = []
    for i, entry in enumerate(entries):
        out = entry.get("output") if isinstance(entry, dict) else None
        if not isinstance(out, list) or not out or not isinstance(out[0], str):
            raise PapiDataError(f"{path}: entry {i} has no text in output[0]")
        texts.append(out[0].strip())
    return texts


def load_papi(
    root: str | os.PathLike | None = None, coding: str = "keyed", personas: bool = True
) -> PapiData:
    """Load a PAPI directory (see :func:`locate_papi`) with the given response coding."""
    if coding not in CODINGS:
        raise _coding_error(coding)
    path = locate_papi(root)
    items = load_item_key(path / "IPIP-NEO-ItemKey.xls")
    train, test = load_split(path / "mpi_300_split.json", items)
    subjects = load_subjects(path / "Test-set.json", items, coding)
    if personas and (path / PERSONA_FILE).is_file():
        for subject, text in zip(subjects, load_personas(path / PERSONA_FILE, len(subjects))):
            subject.persona = text
    return PapiData(
        root=path, coding=coding, inventory=Inventory(items, train, test), subjects=subjects
    )


def select_subjects(
    subjects: Sequence[Subject],
    limit: int | None = None,
    cases: Sequence[int] | None = None,
    sample: int | None = None,
    seed: int = 0,
    shard: str | None = None,
) -> list[Subject]:
    """All subjects, explicit ``cases``, a seeded random ``sample`` of N, the first ``limit``,
    then shard ``"i/N"`` (0-based ``i``): every N-th subject from the i-th, so that the N shards
    split the selection into disjoint, near-equal parts.

    Every argument is checked first (the ``dataset.*`` config keys they come from); a bad value or
    a selection that ends empty raises :class:`~palign.errors.ConfigError` naming the key(s).
    ``cases`` empty or None: no case filter."""
    cases = _check_cases(cases)
    limit = _check_count("limit", limit)
    sample = _check_count("sample", sample)
    if not _is_int(seed) or seed < 0:
        raise ConfigError(
            f"dataset.seed={_value(seed)}: must be an integer >= 0 (default: the top-level seed)"
        )
    shard_parts = parse_shard(shard) if shard is not None else None

    chosen = list(subjects)
    if cases:
        by_case = {s.case: s for s in subjects}
        unknown = [c for c in cases if c not in by_case]
        if unknown:
            raise ConfigError(
                f"dataset.cases: unknown case id(s) {unknown[:10]}"
                f"{' ...' if len(unknown) > 10 else ''} (not among the {len(by_case)} subjects)"
            )
        chosen = [by_case[c] for c in cases]
    if sample is not None:
        if sample > len(chosen):
            source = "listed in dataset.cases" if cases else "available"
            raise ConfigError(
                f"dataset.sample={sample}: must be null or an integer from 1 to {len(chosen)} "
                f"(the number of subjects {source})"
            )
        rng = np.random.default_rng(int(seed))
        picked = np.sort(rng.choice(len(chosen), size=sample, replace=False))
        chosen = [chosen[i] for i in picked]
    if limit is not None:
        chosen = chosen[:limit]
    if shard_parts is not None:
        before = len(chosen)
        index, count = shard_parts
        chosen = chosen[index::count]
        if not chosen and before:
            keys = _selection_keys(cases, sample, limit)
            selected = f"selected by {', '.join(keys)}" if keys else "available"
            raise ConfigError(
                f"dataset.shard={shard!r}: the selection is empty: shard {index} of {count} of "
                f"the {before} subject(s) {selected} gets none (use N <= {before})"
            )
    if not chosen:
        raise ConfigError(
            "the selection is empty: there are no subjects to select from "
            "(dataset.cases, dataset.sample, dataset.limit, dataset.shard)"
        )
    return chosen


def _value(value: object) -> str:
    """A config value as in ``key=value``: null, an integer as is, anything else as its repr."""
    if value is None:
        return "null"
    return str(int(value)) if _is_int(value) else _short(value)


def _selection_keys(cases, sample, limit) -> list[str]:
    """The selection keys that are set, as ``dataset.key=value`` (cases shown by count)."""
    keys = [f"dataset.cases=<{len(cases)} ids>"] if cases else []
    keys += [f"dataset.{k}={v}" for k, v in (("sample", sample), ("limit", limit)) if v is not None]
    return keys


def _check_count(name: str, value: object) -> int | None:
    """``dataset.<name>``: null or an integer >= 1."""
    if value is None:
        return None
    if not _is_int(value) or value < 1:
        raise ConfigError(f"dataset.{name}={_value(value)}: must be null or an integer >= 1")
    return int(value)


def _check_cases(cases: object) -> list[int] | None:
    """``dataset.cases``: null or a list of distinct integer case ids."""
    if cases is None:
        return None
    allowed = "must be null or a list of integer case ids"
    if isinstance(cases, (str, bytes)) or not isinstance(cases, (Sequence, np.ndarray)):
        raise ConfigError(f"dataset.cases={_value(cases)}: {allowed}")
    ids: list[int] = []
    for pos, case in enumerate(cases):
        if not _is_int(case):
            raise ConfigError(f"dataset.cases[{pos}]={_value(case)}: {allowed}")
        ids.append(int(case))
    first: dict[int, int] = {}
    for pos, case in enumerate(ids):
        if case in first:
            raise ConfigError(
                f"dataset.cases[{pos}]={case}: case id listed twice (also at "
                f"dataset.cases[{first[case]}]); list each case once"
            )
        first[case] = pos
    return ids or None


def parse_shard(shard: str) -> tuple[int, int]:
    """``"i/N"`` -> (i, N) with N >= 1 and 0 <= i < N; a clear error naming ``dataset.shard``
    otherwise."""
    allowed = "expected 'i/N' (shard i of N, 0-based: N >= 1 and 0 <= i < N), e.g. 3/16"
    if not isinstance(shard, str):
        raise ConfigError(f"dataset.shard={_value(shard)}: {allowed}")
    try:
        index, count = (int(part) for part in shard.split("/"))
    except ValueError:
        raise ConfigError(f"dataset.shard={shard!r}: {allowed}") from None
    if count < 1:
        raise ConfigError(f"dataset.shard={shard!r}: N = {count}, need N >= 1")
    if not 0 <= index < count:
        raise ConfigError(f"dataset.shard={shard!r}: i = {index}, need 0 <= i < N = {count}")
    return index, count


def keyed(raw: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Raw answers -> keyed scores (6 - raw for key -1); 0 (missing/unparsed) stays 0."""
    return np.where((key < 0) & (raw != 0), 6 - raw, raw)
