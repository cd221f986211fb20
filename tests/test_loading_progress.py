"""The one-off GGUF conversion shows one tqdm bar with an ETA across its phases."""

from __future__ import annotations

import importlib.util
import re
import time

import pytest

from palign.models.loading import (
    CONVERSION_PHASES,
    EMBEDDED_FILE,
    EMBEDDED_PACKAGE,
    converted_gguf_dir,
    embedded_gguf_path,
)
from palign.progress import PhaseBar

#: A render of a bar in percent: "desc:  42%|████      | [00:03<00:04, phase]".
RENDER = re.compile(r"^(?P<desc>.+?):\s*(?P<pct>\d+)%\|.*\| \[(?P<elapsed>[\d:]+)<(?P<eta>[^,\]]+)")


def _renders(err: str, desc: str) -> list[re.Match]:
    """Every render of the bar ``desc`` in captured stderr (tqdm redraws with ``\\r``)."""
    found = [RENDER.match(part.strip()) for part in re.split(r"[\r\n]", err)]
    return [m for m in found if m and m["desc"] == desc]


def test_phase_bar_counts_items_and_shows_an_eta(capsys):
    with PhaseBar("job", {"first": 1, "items": 2, "last": 1}, seconds=1.0, tick=0.05) as bar:
        with bar.phase("first"):
            time.sleep(0.3)
        assert list(bar.items("items", range(7))) == list(range(7))
        with bar.phase("last"):
            time.sleep(0.2)
    err = capsys.readouterr().err
    renders = _renders(err, "job")
    pcts = [int(m["pct"]) for m in renders]
    assert pcts == sorted(pcts) and pcts[-1] == 100
    assert 0 < max(p for p, m in zip(pcts, renders) if "first" in m.string) <= 25
    assert "items 7/7" in err and "items 8/" not in err
    assert any(re.fullmatch(r"\d\d:\d\d", m["eta"].strip()) for m in renders[1:])
    assert "Warning" not in err


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec(EMBEDDED_PACKAGE) is None, reason=f"needs {EMBEDDED_PACKAGE}"
)
def test_gguf_conversion_shows_one_bar_over_its_phases_and_tensors(tmp_path, capsys):
    from gguf import GGUFReader
    from safetensors import safe_open
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    n_tensors = len(GGUFReader(embedded_gguf_path()).tensors)
    transformers_bar, hf_bars = gguf_utils.tqdm, hf_logging.is_progress_bar_enabled()
    capsys.readouterr()

    folder = converted_gguf_dir(cache_dir=str(tmp_path))

    err = capsys.readouterr().err
    renders = _renders(err, f"converting {EMBEDDED_FILE}")
    assert renders, err[-2000:]
    pcts = [int(m["pct"]) for m in renders]
    assert pcts == sorted(pcts) and pcts[-1] == 100
    for label in CONVERSION_PHASES:  # each phase is named while it runs
        assert any(f", {label}" in m.string for m in renders), label
    # transformers' loop over the file's tensors drives the bar, to the file's tensor count
    counts = [int(c) for c in re.findall(rf"dequantising tensors (\d+)/{n_tensors}\]", err)]
    assert counts and counts[-1] == n_tensors and counts == sorted(counts)
    assert f"dequantising tensors {n_tensors + 1}" not in err
    # an ETA is shown (not just "?") before the end
    assert any(re.fullmatch(r"\d\d:\d\d", m["eta"].strip()) for m in renders if m["pct"] != "100")
    # one display: transformers' own bars are routed into it or hidden, and restored after
    for other in ("Converting and de-quantizing", "Loading weights", "Writing model shards"):
        assert other not in err
    assert "Warning" not in err
    assert gguf_utils.tqdm is transformers_bar
    assert hf_logging.is_progress_bar_enabled() == hf_bars
    # what is produced is unchanged: the cache folder, every GGUF tensor saved once
    assert folder.parent == tmp_path and folder.name.startswith(f"{EMBEDDED_FILE[:-5]}-")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (folder / name).is_file(), name
    with safe_open(folder / "model.safetensors", "pt") as f:
        assert len(list(f.keys())) == n_tensors

    # a cached folder is returned at once, without a bar
    assert converted_gguf_dir(cache_dir=str(tmp_path)) == folder
    assert "converting" not in capsys.readouterr().err
