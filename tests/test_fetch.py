"""`palign data fetch` against a local HTTP server (no internet): pinned sums, resume after a
broken download, nothing re-downloaded, a damaged source refused; the Makefile's data step
(fetch when missing, into ``$PALIGN_DATA``; offline, one line says what to do)."""

import os
import shutil
import socket
import subprocess
import sys
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from palign.data.fetch import FILES, fetch, main, sha256
from palign.data.papi import load_papi, locate_papi
from palign.errors import DataError


class RangeHandler(SimpleHTTPRequestHandler):
    """Serves a folder with byte ranges; ``cut``: bytes after which the first response of each
    file breaks off (the connection drops)."""

    requests: list[tuple[str, str | None]] = []
    cut: int | None = None

    def log_message(self, *args):
        pass

    def do_GET(self):
        type(self).requests.append((self.path, self.headers.get("Range")))
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = 0
        if self.headers.get("Range"):
            start = int(self.headers["Range"].removeprefix("bytes=").split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if type(self).cut is not None and start == 0:
            self.wfile.write(body[: type(self).cut])
            self.wfile.flush()
            self.connection.shutdown(2)  # broken off mid-way
            return
        self.wfile.write(body)


@pytest.fixture
def server(tmp_path):
    source = tmp_path / "source"
    shutil.copytree(locate_papi(None), source)
    RangeHandler.requests, RangeHandler.cut = [], None
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(RangeHandler, directory=str(source)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield source, f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()


def test_fetch_checks_sums_and_resumes_a_broken_download(server, tmp_path):
    source, url = server
    dest = tmp_path / "cache"
    RangeHandler.cut = 1000
    with pytest.raises(DataError, match="broke off after 1000 of"):
        fetch(dest, url)
    part = next(dest.glob(".*.part"))
    assert part.stat().st_size == 1000
    RangeHandler.cut = None
    RangeHandler.requests.clear()
    assert fetch(dest, url) == dest
    assert (f"/{part.name[1:-5]}", "bytes=1000-") in RangeHandler.requests  # resumed, not restarted
    for name, (digest, _size) in FILES.items():
        assert (
            sha256(dest / name) == digest
            and (dest / name).read_bytes() == (source / name).read_bytes()
        )
    assert not list(dest.glob(".*.part"))
    assert len(load_papi(dest).subjects) == 300
    RangeHandler.requests.clear()
    fetch(dest, url)
    assert RangeHandler.requests == []  # in place with the right sums: nothing downloaded


def test_a_damaged_source_is_refused_and_nothing_put_in_place(server, tmp_path, capsys):
    source, url = server
    data = bytearray((source / "mpi_300_split.json").read_bytes())
    data[10] ^= 1
    (source / "mpi_300_split.json").write_bytes(bytes(data))
    dest = tmp_path / "cache"
    with pytest.raises(SystemExit) as stop:
        main(["--dir", str(dest), "--url", url])
    err = capsys.readouterr().err
    assert stop.value.code == 1 and "Traceback" not in err
    (line,) = [x for x in err.splitlines() if "error:" in x]
    assert "mpi_300_split.json: sha256" in line and FILES["mpi_300_split.json"][0] in line
    assert not (dest / "mpi_300_split.json").exists()


def test_fetched_files_are_found_in_the_cache(server, tmp_path, monkeypatch):
    _, url = server
    monkeypatch.setenv("PALIGN_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("PALIGN_DATA", raising=False)
    monkeypatch.chdir(tmp_path)  # no ./data/papi nor ../shared/papi here
    monkeypatch.setattr("palign.data.papi._project_root", lambda: tmp_path)
    with pytest.raises(DataError, match="palign data fetch"):
        locate_papi(None)
    assert main(["--url", url]) == 0
    assert locate_papi(None) == tmp_path / "cache" / "papi"


# --- the Makefile's data step (`make demo`, `make test` and the reproduce targets run it first) --

ROOT = Path(__file__).resolve().parents[1]


def _make(*args: str, **env: str) -> subprocess.CompletedProcess:
    """``make`` in the checkout with this interpreter as the venv's Python; the venv's stamp is
    taken as up to date (``-o``), so that no set-up is run."""
    return subprocess.run(
        ["make", "--no-print-directory", "-C", str(ROOT), "-o", ".venv/.palign-installed",
         f"PY={sys.executable}", *args],
        capture_output=True, text=True, timeout=300, env={**os.environ, **env},
    )  # fmt: skip


@pytest.mark.parametrize("target, then", [("demo", "-m palign "), ("test", "-m pytest")])
def test_make_demo_and_test_fetch_missing_data_first(target, then):
    done = _make("-n", target)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    fetch_line = next(i for i, x in enumerate(lines) if "-m palign.data.fetch --if-missing" in x)
    assert fetch_line < next(i for i, x in enumerate(lines) if then in x)


def test_make_data_fetches_into_an_empty_palign_data_once(server, tmp_path):
    source, url = server
    data = tmp_path / "papi"
    data.mkdir()
    done = _make("data", PALIGN_DATA=str(data), PALIGN_DATA_URL=url)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"PAPI files in {data} (sha256 checked)" in done.stdout
    for name, (digest, _size) in FILES.items():
        assert sha256(data / name) == digest
    RangeHandler.requests.clear()
    again = _make("data", PALIGN_DATA=str(data), PALIGN_DATA_URL=url)
    assert again.returncode == 0 and f"PAPI files found in {data}" in again.stdout
    assert RangeHandler.requests == []  # found where palign looks: nothing downloaded


def test_make_data_offline_says_in_one_line_what_to_do(tmp_path):
    with socket.socket() as s:  # a port nothing listens on: the download is refused
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/"
    done = _make("data", PALIGN_DATA=str(tmp_path / "papi"), PALIGN_DATA_URL=url)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    (error,) = [x for x in done.stderr.splitlines() if "error:" in x and "make:" not in x]
    assert error.startswith("palign data fetch: error: ") and url in error
    (hint,) = [x for x in done.stderr.splitlines() if "hint:" in x]
    assert "$PALIGN_DATA_URL" in hint and "$PALIGN_DATA at a copy" in hint
