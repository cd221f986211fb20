"""Bad input is refused while loading and selecting, before any model work, with one line that
names the culprit: the file and the record/field, or the ``dataset.*`` key, its value and what is
allowed. Every file case corrupts one file of a copy of the real PAPI folder."""

from __future__ import annotations

import json
import shutil

import pytest
from omegaconf import OmegaConf

from palign.data import PapiDataError, load_papi, select_subjects
from palign.errors import ConfigError

TEST_SET = "Test-set.json"
SPLIT = "mpi_300_split.json"
ITEM_KEY = "IPIP-NEO-ItemKey.xls"
PERSONAS = "personality_prompt.json"


def _assert_one_line_naming(error: Exception, fragments: list[str]) -> None:
    message = str(error)
    assert message and "\n" not in message and "\r" not in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


# --- dataset.* selection keys --------------------------------------------------------------------
# Each case: the keyword arguments of select_subjects (a function of the real case ids ``c``) and
# what the message must name ({c0}, {c1}: the first two case ids).

SELECTION_CASES = {
    "limit -1": (lambda c: dict(limit=-1), ["dataset.limit=-1", "null or an integer >= 1"]),
    "limit 0": (lambda c: dict(limit=0), ["dataset.limit=0", "null or an integer >= 1"]),
    "limit float": (lambda c: dict(limit=2.5), ["dataset.limit=2.5"]),
    "limit str": (lambda c: dict(limit="3"), ["dataset.limit='3'"]),
    "limit bool": (lambda c: dict(limit=True), ["dataset.limit=True"]),
    "sample 0": (lambda c: dict(sample=0), ["dataset.sample=0", "null or an integer >= 1"]),
    "sample -2": (lambda c: dict(sample=-2), ["dataset.sample=-2"]),
    "sample float": (lambda c: dict(sample=1.5), ["dataset.sample=1.5"]),
    "sample > subjects": (lambda c: dict(sample=301), ["dataset.sample=301", "from 1 to 300"]),
    "sample > cases": (
        lambda c: dict(cases=c[:2], sample=3),
        ["dataset.sample=3", "from 1 to 2", "dataset.cases"],
    ),
    "cases float": (lambda c: dict(cases=[c[0], 1.5]), ["dataset.cases[1]=1.5", "integer"]),
    "cases bool": (lambda c: dict(cases=[True]), ["dataset.cases[0]=True"]),
    "cases str item": (lambda c: dict(cases=[str(c[0])]), ["dataset.cases[0]='{c0}'"]),
    "cases nested": (lambda c: dict(cases=[[c[0]]]), ["dataset.cases[0]=[{c0}]"]),
    "cases str": (lambda c: dict(cases=str(c[0])), ["dataset.cases='{c0}'", "list"]),
    "cases int": (lambda c: dict(cases=c[0]), ["dataset.cases={c0}", "list"]),
    "cases duplicate": (
        lambda c: dict(cases=[c[0], c[1], c[0]]),
        ["dataset.cases[2]={c0}", "twice", "dataset.cases[0]"],
    ),
    "cases unknown": (
        lambda c: dict(cases=[c[0], -5]),
        ["dataset.cases", "unknown case id(s) [-5]"],
    ),
    "cases ListConfig nested": (
        lambda c: dict(cases=OmegaConf.create({"x": [c[0], [c[1]]]}).x),
        ["dataset.cases[1]=[{c1}]"],
    ),
    "cases ListConfig duplicate": (
        lambda c: dict(cases=OmegaConf.create({"x": [c[1], c[1]]}).x),
        ["dataset.cases[1]={c1}", "twice"],
    ),
    "shard i = N": (lambda c: dict(shard="3/3"), ["dataset.shard='3/3'", "0 <= i < N"]),
    "shard N = 0": (lambda c: dict(shard="0/0"), ["dataset.shard='0/0'", "N >= 1"]),
    "shard N < 0": (lambda c: dict(shard="1/-2"), ["dataset.shard='1/-2'", "N >= 1"]),
    "shard i < 0": (lambda c: dict(shard="-1/4"), ["dataset.shard='-1/4'", "0 <= i < N"]),
    "shard not i/N": (lambda c: dict(shard="1-3"), ["dataset.shard='1-3'", "'i/N'"]),
    "shard letters": (lambda c: dict(shard="x/2"), ["dataset.shard='x/2'", "'i/N'"]),
    "shard int": (lambda c: dict(shard=3), ["dataset.shard=3", "'i/N'"]),
    "seed -1": (lambda c: dict(sample=2, seed=-1), ["dataset.seed=-1", "integer >= 0"]),
    "seed str": (lambda c: dict(seed="a"), ["dataset.seed='a'", "integer >= 0"]),
    "seed float": (lambda c: dict(seed=1.5), ["dataset.seed=1.5"]),
    "empty by limit and shard": (
        lambda c: dict(limit=3, shard="5/8"),
        ["dataset.shard='5/8'", "dataset.limit=3", "selection is empty"],
    ),
    "empty by cases and shard": (
        lambda c: dict(cases=c[:2], shard="2/4"),
        ["dataset.shard='2/4'", "dataset.cases", "selection is empty"],
    ),
    "empty by sample and shard": (
        lambda c: dict(sample=1, limit=5, shard="1/2"),
        ["dataset.shard='1/2'", "dataset.sample=1", "dataset.limit=5", "selection is empty"],
    ),
}


@pytest.mark.parametrize(
    "kwargs, fragments", list(SELECTION_CASES.values()), ids=list(SELECTION_CASES)
)
def test_bad_selection_is_a_config_error(papi, kwargs, fragments):
    ids = [s.case for s in papi.subjects]
    with pytest.raises(ConfigError) as caught:
        select_subjects(papi.subjects, **kwargs(ids))
    _assert_one_line_naming(caught.value, [f.format(c0=ids[0], c1=ids[1]) for f in fragments])


def test_valid_selections_are_unchanged(papi):
    subjects = papi.subjects
    ids = [s.case for s in subjects]
    assert [s.case for s in select_subjects(subjects, limit=300)] == ids
    assert [s.case for s in select_subjects(subjects, limit=1000)] == ids
    assert [s.case for s in select_subjects(subjects, sample=300)] == ids
    assert [s.case for s in select_subjects(subjects, cases=[])] == ids
    listed = OmegaConf.create({"cases": [ids[4], ids[1]]}).cases
    assert [s.case for s in select_subjects(subjects, cases=listed)] == [ids[4], ids[1]]
    assert len(select_subjects(subjects, limit=3, shard="2/3")) == 1


# --- malformed files ------------------------------------------------------------------------------


def _json_edit(edit, replace: bool = False):
    """A corruption that loads a JSON file, lets ``edit`` change it in place (``replace``: return
    the new content) and writes it back."""

    def corrupt(path):
        data = json.loads(path.read_text(encoding="utf-8"))
        result = edit(data)
        path.write_text(json.dumps(result if replace else data), encoding="utf-8")

    return corrupt


def _bytes_edit(old: bytes, new: bytes):
    """Replace the one occurrence of ``old`` (same length keeps binary files well-formed)."""

    def corrupt(path):
        data = path.read_bytes()
        assert data.count(old) >= 1, old
        path.write_bytes(data.replace(old, new, 1))

    return corrupt


def _write(content: bytes):
    def corrupt(path):
        path.write_bytes(content)

    return corrupt


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _set(index, field, value):
    return _json_edit(lambda records: records[index].__setitem__(field, value))


def _pop(index, field):
    return _json_edit(lambda records: records[index].pop(field))


def _split_set(name, value, pos=None):
    def edit(split):
        if pos is None:
            split[name] = value
        else:
            split[name][pos] = value

    return _json_edit(edit)


# Each case: the file to corrupt, how, and what the message must name besides the file name.
FILE_CASES = {
    # Test-set.json
    "test-set not utf-8": (TEST_SET, _bytes_edit(b'"USA"', b'"U\xffA"'), ["not UTF-8"]),
    "test-set truncated json": (TEST_SET, _truncate, ["invalid JSON at line"]),
    "test-set empty file": (TEST_SET, _write(b""), ["empty"]),
    "test-set object": (
        TEST_SET,
        _json_edit(lambda r: {"records": r}, replace=True),
        ["JSON list", "dict"],
    ),
    "test-set no records": (TEST_SET, _write(b"[]"), ["list of subject records is empty"]),
    "record not object": (
        TEST_SET,
        _json_edit(lambda r: r.__setitem__(5, 3)),
        ["record 5", "expected a JSON object, got 3"],
    ),
    "record lacks case": (TEST_SET, _pop(2, "case"), ["record 2", "missing field 'case'"]),
    "case str": (TEST_SET, _set(4, "case", "abc"), ["record 4", "'case' = 'abc'"]),
    "case float": (TEST_SET, _set(4, "case", 1.5), ["record 4", "'case' = 1.5"]),
    "case null": (TEST_SET, _set(4, "case", None), ["record 4", "'case' = None"]),
    "case bool": (TEST_SET, _set(4, "case", True), ["record 4", "'case' = True"]),
    "duplicate case": (
        TEST_SET,
        _json_edit(lambda r: r[9].__setitem__("case", r[1]["case"])),
        ["record 9", "duplicate case", "record 1"],
    ),
    "answer missing": (TEST_SET, _pop(3, "i17"), ["record 3", "missing item field 'i17'"]),
    "answer null": (TEST_SET, _set(3, "i5", None), ["record 3", "null item field 'i5'"]),
    "answer 6": (TEST_SET, _set(7, "i250", 6), ["record 7", "'i250' = 6", "0..5"]),
    "answer -1": (TEST_SET, _set(7, "i1", -1), ["record 7", "'i1' = -1", "0..5"]),
    "answer str": (TEST_SET, _set(0, "i300", "4"), ["record 0", "'i300' = '4'"]),
    "answer float": (TEST_SET, _set(299, "i42", 2.5), ["record 299", "'i42' = 2.5"]),
    "answer bool": (TEST_SET, _set(12, "i9", True), ["record 12", "'i9' = True"]),
    # mpi_300_split.json
    "split not utf-8": (SPLIT, _bytes_edit(b'"test_index"', b'"test_\xe9ndex"'), ["not UTF-8"]),
    "split invalid json": (SPLIT, _bytes_edit(b"]", b""), ["invalid JSON at line"]),
    "split empty file": (SPLIT, _write(b"  \n"), ["empty"]),
    "split empty object": (SPLIT, _write(b"{}"), ["missing field 'train_index'"]),
    "split lacks test_index": (
        SPLIT,
        _json_edit(lambda s: s.pop("test_index")),
        ["missing field 'test_index'"],
    ),
    "split is a list": (
        SPLIT,
        _json_edit(lambda s: [s["train_index"], s["test_index"]], replace=True),
        ["JSON object", "train_index", "list"],
    ),
    "split empty train": (SPLIT, _split_set("train_index", []), ["'train_index' = []"]),
    "split test not list": (SPLIT, _split_set("test_index", 5), ["'test_index' = 5"]),
    "split str id": (SPLIT, _split_set("train_index", "7", 3), ["train_index[3] = '7'"]),
    "split bool id": (SPLIT, _split_set("train_index", True, 0), ["train_index[0] = True"]),
    "split id 0": (SPLIT, _split_set("test_index", 0, 2), ["test_index[2] = 0", "1..300"]),
    "split duplicate id": (
        SPLIT,
        _json_edit(lambda s: s["test_index"].__setitem__(1, s["test_index"][0])),
        ["test_index lists item", "twice"],
    ),
    # IPIP-NEO-ItemKey.xls (same-length byte edits of the sheet's strings keep the file readable)
    "item key lacks Full#": (ITEM_KEY, _bytes_edit(b"Full#", b"Fullx"), ["lacks column(s) Full#"]),
    "item key lacks Facet": (ITEM_KEY, _bytes_edit(b"Facet", b"Facit"), ["lacks column(s) Facet"]),
    "item key lacks Sign": (ITEM_KEY, _bytes_edit(b"Sign", b"Sigh"), ["lacks column(s) Sign"]),
    "item key bad sign": (ITEM_KEY, _bytes_edit(b"+N1", b"*N1"), ["row 2 (Full#=1)", "'*N1'"]),
    "item key truncated": (ITEM_KEY, _truncate, ["cannot read the item key"]),
    "item key not xls": (ITEM_KEY, _write(b"Full#,Sign\n1,+N1\n"), ["cannot read the item key"]),
    # personality_prompt.json
    "personas not utf-8": (PERSONAS, _bytes_edit(b"You", b"\xc3(u"), ["not UTF-8"]),
    "personas invalid json": (PERSONAS, _truncate, ["invalid JSON at line"]),
    "persona without output": (
        PERSONAS,
        _json_edit(lambda e: e[7].pop("output")),
        ["entry 7", "output[0]"],
    ),
}


@pytest.fixture
def papi_dir(papi, tmp_path):
    """A copy of the real PAPI folder."""
    for name in (TEST_SET, SPLIT, ITEM_KEY, PERSONAS):
        shutil.copy(papi.root / name, tmp_path / name)
    return tmp_path


def test_the_unchanged_copy_loads(papi_dir):
    assert len(load_papi(papi_dir).subjects) == 300


@pytest.mark.parametrize(
    "name, corrupt, fragments", list(FILE_CASES.values()), ids=list(FILE_CASES)
)
def test_bad_file_is_a_data_error(papi_dir, name, corrupt, fragments):
    corrupt(papi_dir / name)
    with pytest.raises(PapiDataError) as caught:
        load_papi(papi_dir)
    _assert_one_line_naming(caught.value, [str(papi_dir / name), *fragments])


@pytest.mark.parametrize("coding", ["raw", "", None])
def test_unknown_coding_names_the_protocol_key(papi_dir, coding):
    with pytest.raises(ConfigError) as caught:
        load_papi(papi_dir, coding=coding)
    _assert_one_line_naming(caught.value, [f"protocol.coding={coding!r}", "keyed", "as_stored"])
