"""Download the PAPI files: ``palign data fetch [--dir DIR] [--url URL] [--if-missing]``.

The files come from the ``PAPI/`` folder of the public repository zhu-minjun/PAlign at a pinned
commit, and each is checked against its pinned sha256 before it is put in place. An interrupted
download is kept as ``.<name>.part`` and resumed (HTTP range request) by the next fetch; files
already in place with the right sum are not downloaded again. The default folder is
``$PALIGN_DATA`` when set (palign looks there first), else ``<cache>/papi`` (``$PALIGN_CACHE`` or
``~/.cache/palign``), where palign looks for the data after ``dataset.root``, ``$PALIGN_DATA``,
``./data/papi`` and ``../shared/papi``; ``$PALIGN_DATA_URL`` (or ``--url``) replaces the source,
e.g. a mirror. ``--if-missing`` (what ``make demo`` and ``make test`` run first) downloads only
when palign finds no PAPI files where it looks.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from palign import cache_root
from palign.errors import DataError, cli

#: The reference repository's commit the files are pinned to.
COMMIT = "18e1e3404951acc864f30f323a0e47a0840b474a"
BASE_URL = f"https://raw.githubusercontent.com/zhu-minjun/PAlign/{COMMIT}/PAPI/"
#: name -> (sha256, size in bytes) of the files at :data:`COMMIT`.
FILES = {
    "Test-set.json": ("5e46c6cf2b0d72762cce69fe455ae827f2c4cdc27a0979dc9b1e58d09b9ae4c6", 1649953),
    "mpi_300_split.json": (
        "85c761554504dd1b086de98e13fe84fb6e02915ad7bf2e234bb32428894a52c6",
        1425,
    ),
    "IPIP-NEO-ItemKey.xls": (
        "586e92af319bdea185e18a56894191504336e067d0454522da345c43688ce158",
        54784,
    ),
    "personality_prompt.json": (
        "400a5d941d77caf04e5450f887f64e5a96e7906f420e0b12c3690f39734af008",
        2421873,
    ),
}
CHUNK = 1 << 16


def default_dir() -> Path:
    """``$PALIGN_DATA`` when set (where palign looks first), else ``<cache>/papi``."""
    env = os.environ.get("PALIGN_DATA")
    return Path(env).expanduser() if env else cache_root() / "papi"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _download(url: str, part: Path, size: int, name: str) -> None:
    """Append the rest of ``url`` to ``part`` (a range request from its current length)."""
    have = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have >= size:  # nothing left to fetch
            return
        raise DataError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise DataError(
            f"{url}: cannot download ({getattr(e, 'reason', e)})",
            "check the connection, or set $PALIGN_DATA_URL to a mirror, or point $PALIGN_DATA "
            "at a copy of the PAPI files",
        ) from None
    with response:
        if have and response.status != 206:  # the server ignored the range: start over
            have = 0
        mode = "ab" if have else "wb"
        with (
            open(part, mode) as f,
            tqdm(
                total=size, initial=have, desc=name, unit="B", unit_scale=True, leave=False
            ) as bar,
        ):
            try:
                for block in iter(lambda: response.read(CHUNK), b""):
                    f.write(block)
                    bar.update(len(block))
            except OSError:  # a dropped connection: what arrived is kept below
                pass
            got = f.tell()
    if got < size:
        raise DataError(
            f"{url}: the download broke off after {got} of {size} bytes",
            "run the same command again: it resumes from there",
        )


def fetch(dest: str | os.PathLike | None = None, base_url: str | None = None) -> Path:
    """Download every PAPI file missing from ``dest`` (default :func:`default_dir`), check its
    sha256 and put it in place; returns the folder."""
    folder = Path(dest).expanduser() if dest else default_dir()
    base = base_url or os.environ.get("PALIGN_DATA_URL") or BASE_URL
    base = base if base.endswith("/") else base + "/"
    folder.mkdir(parents=True, exist_ok=True)
    for name, (digest, size) in FILES.items():
        path = folder / name
        if path.is_file() and sha256(path) == digest:
            continue
        part = folder / f".{name}.part"
        if part.is_file() and part.stat().st_size > size:
            part.unlink()  # longer than the file can be: not ours
        _download(base + name, part, size, name)
        got = sha256(part)
        if got != digest:
            length = part.stat().st_size
            part.unlink()
            raise DataError(
                f"{base + name}: sha256 {got} ({length} bytes), expected {digest} ({size} bytes)",
                "the source changed or the download was damaged; nothing was put in place",
            )
        os.replace(part, path)
    return folder


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="palign data fetch",
        description="Download the PAPI files (pinned sha256 sums) where palign finds them.",
    )
    parser.add_argument("--dir", help=f"where to put them (default: {default_dir()})")
    parser.add_argument("--url", help="the folder URL to download from (default: GitHub)")
    parser.add_argument(
        "--if-missing",
        action="store_true",
        help="download only when palign finds no PAPI files where it looks ($PALIGN_DATA, "
        "./data/papi, ../shared/papi, the cache)",
    )
    args = parser.parse_args(argv)
    with cli("palign data fetch"):
        if args.if_missing and not args.dir:
            from palign.data.papi import PapiDataError, locate_papi

            try:
                folder = locate_papi(None)
            except PapiDataError:
                pass
            else:
                print(f"PAPI files found in {folder}")
                return 0
        folder = fetch(args.dir, args.url)
    print(f"PAPI files in {folder} (sha256 checked)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
