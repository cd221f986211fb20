import json
import shutil

import numpy as np
import pytest

from palign.data import PapiDataError, keyed, load_papi, locate_papi, select_subjects
from palign.data.check import keyed_mean_correlations, verdict
from palign.data.check import main as check_main
from palign.errors import ConfigError


def test_items_are_looked_up_by_full_number(papi):
    items = papi.inventory.items
    assert len(items) == 300
    assert items[1].text == "Worry about things." and items[1].trait == "N" and items[1].key == 1
    # The key's 9th row is Full# 99: rows are not in Full# order.
    assert items[99].text == "Use others for my own ends." and items[99].trait == "A"
    assert items[99].key == -1
    assert len(papi.inventory.train) == 120 and len(papi.inventory.test) == 180
    assert not set(papi.inventory.train) & set(papi.inventory.test)


def test_subject_answers_follow_item_numbers(papi):
    raw = json.load(open(papi.root / "Test-set.json"))[0]
    subject = papi.subjects[0]
    assert subject.case == raw["case"] == 172481
    for n in (1, 4, 99, 300):
        stored = raw[f"i{n}"]
        expected = 6 - stored if papi.inventory.items[n].key < 0 and stored else stored
        assert subject.answers([n])[0] == expected


def test_codings_differ_only_on_negatively_keyed_items(papi):
    stored = load_papi(coding="as_stored", personas=False)
    key = np.array([papi.inventory.items[n].key for n in range(1, 301)])
    a, b = papi.answers, stored.answers
    assert (a[:, key > 0] == b[:, key > 0]).all()
    neg = b[:, key < 0]
    assert (a[:, key < 0] == np.where(neg == 0, 0, 6 - neg)).all()
    # Answer counts of the README (stored values): 0: 52, 1: 1600, ..., 5: 6569.
    assert np.bincount(b.ravel(), minlength=6).tolist() == [52, 1600, 15596, 29336, 36847, 6569]


def test_keyed_leaves_missing_answers_missing():
    assert keyed(np.array([0, 1, 5, 0, 2]), np.array([-1, -1, -1, 1, 1])).tolist() == [
        0,
        5,
        1,
        0,
        2,
    ]


def test_coding_check_finds_keyed_storage(papi, capsys):
    stored = load_papi(coding="as_stored", personas=False)
    items = [papi.inventory.items[n] for n in range(1, 301)]
    corr = keyed_mean_correlations(
        stored.answers, np.array([i.trait for i in items]), np.array([i.key for i in items])
    )
    assert {t: round(r, 2) for t, r in corr.items()} == {
        "A": 0.77,
        "C": 0.82,
        "E": 0.86,
        "N": 0.88,
        "O": 0.78,
    }
    assert verdict(corr) == "keyed"
    # Decoded to raw, the same statistic turns negative: the check then says as_stored.
    raw_corr = keyed_mean_correlations(
        papi.answers, np.array([i.trait for i in items]), np.array([i.key for i in items])
    )
    assert verdict(raw_corr) == "as_stored"
    assert check_main([str(papi.root)]) == 0
    assert "Verdict: keyed" in capsys.readouterr().out


def test_personas_are_index_aligned(papi):
    assert all(s.persona for s in papi.subjects)
    assert papi.subjects[0].persona.startswith("You")


def test_subject_selection(papi):
    subjects = papi.subjects
    assert [s.case for s in select_subjects(subjects, limit=2)] == [
        subjects[0].case,
        subjects[1].case,
    ]
    picked = select_subjects(subjects, cases=[subjects[5].case, subjects[2].case])
    assert [s.index for s in picked] == [5, 2]
    a = select_subjects(subjects, sample=10, seed=1)
    assert [s.case for s in a] == [s.case for s in select_subjects(subjects, sample=10, seed=1)]
    assert [s.case for s in a] != [s.case for s in select_subjects(subjects, sample=10, seed=2)]
    with pytest.raises(ConfigError, match="unknown case id"):
        select_subjects(subjects, cases=[-5])


# --- malformed files: each is one clear error naming file and record ---------------------------


@pytest.fixture
def papi_copy(papi, tmp_path):
    for name in (
        "Test-set.json",
        "mpi_300_split.json",
        "IPIP-NEO-ItemKey.xls",
        "personality_prompt.json",
    ):
        shutil.copy(papi.root / name, tmp_path / name)
    return tmp_path


def _edit_records(root, edit):
    records = json.load(open(root / "Test-set.json"))
    edit(records)
    (root / "Test-set.json").write_text(json.dumps(records))


def test_bad_json(papi_copy):
    (papi_copy / "Test-set.json").write_text('[{"case": 1,, }]')
    with pytest.raises(PapiDataError, match=r"Test-set.json: invalid JSON at line 1, column"):
        load_papi(papi_copy)


def test_missing_item(papi_copy):
    _edit_records(papi_copy, lambda r: r[3].pop("i17"))
    with pytest.raises(
        PapiDataError, match=r"Test-set.json: record 3 \(case \d+\): missing item field 'i17'"
    ):
        load_papi(papi_copy)


@pytest.mark.parametrize("value", [6, -1, "4", 2.5, True])
def test_value_out_of_range(papi_copy, value):
    _edit_records(papi_copy, lambda r: r[7].__setitem__("i250", value))
    with pytest.raises(
        PapiDataError, match=r"record 7 \(case \d+\): field 'i250' = .* is not an answer in 0..5"
    ):
        load_papi(papi_copy)


def test_duplicate_case(papi_copy):
    _edit_records(papi_copy, lambda r: r[10].__setitem__("case", r[4]["case"]))
    with pytest.raises(
        PapiDataError, match=r"record 10 \(case \d+\): duplicate case, first seen at record 4"
    ):
        load_papi(papi_copy)


def test_unknown_item_in_split(papi_copy):
    split = json.load(open(papi_copy / "mpi_300_split.json"))
    split["test_index"][5] = 301
    (papi_copy / "mpi_300_split.json").write_text(json.dumps(split))
    with pytest.raises(
        PapiDataError, match=r"mpi_300_split.json: test_index\[5\] = 301 is not an item id"
    ):
        load_papi(papi_copy)


def test_split_overlap(papi_copy):
    split = json.load(open(papi_copy / "mpi_300_split.json"))
    split["test_index"][0] = split["train_index"][0]
    (papi_copy / "mpi_300_split.json").write_text(json.dumps(split))
    with pytest.raises(PapiDataError, match="in both train and test"):
        load_papi(papi_copy)


def test_persona_file_length_mismatch(papi_copy):
    entries = json.load(open(papi_copy / "personality_prompt.json"))
    (papi_copy / "personality_prompt.json").write_text(json.dumps(entries[:-1]))
    with pytest.raises(
        PapiDataError, match="personality_prompt.json: expected a list of 300 entries, got 299"
    ):
        load_papi(papi_copy)


def test_missing_directory_says_where_to_get_the_data(tmp_path, monkeypatch):
    with pytest.raises(PapiDataError, match=r"lacks Test-set.json.*zhu-minjun/PAlign"):
        locate_papi(tmp_path)
    monkeypatch.setenv("PALIGN_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(PapiDataError, match=r"\$PALIGN_DATA=.*WestlakeNLP/PAPI-300K"):
        locate_papi()


def test_unknown_coding(papi_copy):
    with pytest.raises(ConfigError, match="protocol.coding='raw'"):
        load_papi(papi_copy, coding="raw")
