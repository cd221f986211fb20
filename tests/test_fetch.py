"""`palign data fetch` against a local HTTP server (no internet): pinned sums, resume after a
broken download, nothing re-downloaded, a damaged source refused."""

import shutil
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
