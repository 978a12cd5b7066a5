"""Fetch the published artefacts (``brainrecon download``): resumable, verified, unpacked, recorded.

A file is fetched into ``<file>.part``, resumed with an HTTP Range request after an interruption (or
fetched from the start when the server ignores Range), checked against the known size and
checksums and for what it must hold (``check_content``: an ``.h5`` file must be HDF5, not an HTML
error page), then renamed into place; a file that fails the checks is deleted and fetched once more.
Zip archives are unpacked into a folder next to them (members that would land outside it are
refused) and their expected files checked. Entries without a known figshare file id are looked up
by name in their article's public file list (``<api>/articles/<id>/files``, paginated), which gives
the id, size and md5 the download is checked against. ``manifest.json`` in the download folder records each
artefact (name, url, size, sha256, md5, time, files); a recorded artefact whose files are present
is not fetched again.
"""
from __future__ import annotations

import difflib
import hashlib
import http.client
import json
import re
import shutil
import time
import zipfile
import zlib
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from urllib.error import HTTPError, URLError
from urllib.parse import urlencode
from urllib.request import Request, urlopen

import h5py

from .. import __version__
from .stimuli import IMAGE_EXTENSIONS
from .registry import (
    API_ENV,
    ARTEFACTS,
    FIGSHARE_API,
    GROUP_HELP,
    GROUPS,
    MIRROR_ENV,
    Artefact,
    api_url,
    default_home,
    expand,
    find_by_filename,
    mirror_url,
)

CHUNK = 1 << 20
TIMEOUT = 60          # seconds without data before a connection counts as broken
RETRIES = 3           # automatic resumes after a broken connection
RETRY_WAIT = 2.0      # seconds before the 2nd, 3rd... resume (the first is immediate)
MANIFEST = "manifest.json"
PAGE_SIZE = 100       # entries per page of a figshare file list
MAX_PAGES = 100
USER_AGENT = f"brainrecon/{__version__} (python urllib)"

Log = Callable[[str], None]


class DownloadError(RuntimeError):
    """A failed download; the message names the URL or file and what to do."""


@dataclass
class Fetched:
    """A verified download."""
    path: Path
    url: str
    size: int
    sha256: str
    md5: str


def _quiet(_msg: str) -> None:
    pass


def _mb(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e6:.1f} MB"


def _http_advice(code: int, hint: str) -> str:
    if code in (404, 410):
        return hint or "check the address"
    if code in (401, 403):
        return "access was refused: the file may have been withdrawn; " + (hint or "check the address")
    if code == 429 or code >= 500:
        return "the server is busy or failing: try again later"
    return hint or "check the address"


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """``bytes 100-199/1000`` -> (100, 1000); ``bytes */1000`` -> (None, 1000)."""
    try:
        span, _, total = value.split(" ", 1)[1].partition("/")
        start = None if span == "*" else int(span.split("-")[0])
        return start, None if total in ("", "*") else int(total)
    except (AttributeError, IndexError, ValueError):
        return None, None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    tmp.replace(path)


def _transfer(url: str, part: Path, *, label: str, hint: str, progress, retries: int, timeout: float,
              log: Log) -> None:
    """Bring ``part`` to the full content of ``url``, resuming it with Range requests."""
    meta_path = part.with_name(part.name + ".json")  # total size and ETag of the partial file
    task = progress.add_task(label, total=None) if progress is not None else None
    try:
        for attempt in range(retries + 1):
            if attempt > 1:
                time.sleep(RETRY_WAIT * (attempt - 1))
            have = part.stat().st_size if part.exists() else 0
            meta = _read_json(meta_path) if have else {}
            headers = {"User-Agent": USER_AGENT}
            if have:
                headers["Range"] = f"bytes={have}-"
                if meta.get("etag"):
                    headers["If-Range"] = meta["etag"]
            try:
                resp = urlopen(Request(url, headers=headers), timeout=timeout)
            except HTTPError as e:
                if e.code == 416 and have:   # nothing left to send, or the file changed
                    if _content_range(e.headers.get("Content-Range"))[1] == have:
                        return
                    part.unlink()
                    meta_path.unlink(missing_ok=True)
                    continue
                raise DownloadError(f"{url}: HTTP {e.code} {e.reason}; {_http_advice(e.code, hint)}") from None
            except (URLError, OSError, http.client.HTTPException) as e:
                reason = getattr(e, "reason", None) or e
                if attempt < retries:
                    log(f"{label}: cannot connect ({reason}); trying again")
                    continue
                raise DownloadError(f"{url}: cannot connect ({reason}); check the network connection, "
                                    f"or set {MIRROR_ENV} to a server holding a copy of the files") from None
            with resp:
                length = resp.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
                if have and resp.status == 206:
                    start, total = _content_range(resp.headers.get("Content-Range"))
                    if start != have or (meta.get("total") and total and total != meta["total"]):
                        log(f"{label}: the file on the server changed; downloading from the start")
                        part.unlink()
                        continue
                    mode = "ab"
                else:
                    if have:
                        log(f"{label}: the server sent the whole file instead of the rest; downloading from the start")
                    have, mode = 0, "wb"
                _write_json(meta_path, {"url": url, "total": total, "etag": resp.headers.get("ETag")})
                if task is not None:
                    progress.update(task, total=total, completed=have)
                got, broken = have, None
                with open(part, mode) as f:
                    while True:
                        try:
                            chunk = resp.read(CHUNK)
                        except (http.client.HTTPException, OSError) as e:   # reset, timeout, incomplete
                            broken = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                            break
                        if not chunk:
                            break
                        try:
                            f.write(chunk)
                        except OSError as e:
                            raise DownloadError(f"{part}: cannot write ({e.strerror or e}); free disk space "
                                                "or choose another folder with --dest") from None
                        got += len(chunk)
                        if task is not None:
                            progress.update(task, completed=got)
            if broken is None and total is not None and got < total:
                broken = "connection closed early"
            if broken is None:
                return
            if attempt < retries:
                log(f"{label}: transfer interrupted at {_mb(got)} of {_mb(total)} ({broken}); resuming")
                continue
            raise DownloadError(f"{url}: transfer interrupted after {_mb(got)} of {_mb(total)} ({broken}); "
                                f"the partial file {part} is kept: run the same command again to resume")
        raise DownloadError(f"{url}: the download did not complete after {retries + 1} tries; run the "
                            "same command again to resume")
    finally:
        if task is not None:
            progress.remove_task(task)


def file_digests(path: Path) -> tuple[int, str, str]:
    """(size, sha256, md5) of a file."""
    sha, md5, size = hashlib.sha256(), hashlib.md5(), 0
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            sha.update(block)
            md5.update(block)
            size += len(block)
    return size, sha.hexdigest(), md5.hexdigest()


def _mismatch(got: tuple[int, str, str], size, sha256, md5) -> str | None:
    n, s, m = got
    if size is not None and n != size:
        return f"size {n} bytes, expected {size}"
    if sha256 and s != sha256.lower():
        return f"sha256 {s}, expected {sha256}"
    if md5 and m != md5.lower():
        return f"md5 {m}, expected {md5}"
    return None


_KINDS = ("bdata", "hdf5", "zip", "torch", "mat", "tsv")
_KIND_BY_SUFFIX = {".h5": "hdf5", ".hdf5": "hdf5", ".zip": "zip", ".pt": "torch", ".pth": "torch", ".mat": "mat",
                   ".tsv": "tsv"}
_MAX_TSV = 50_000_000   # bytes: a stimulus list is far smaller
_WEB_STARTS = ((b"<!doctype", "an HTML page"), (b"<html", "an HTML page"), (b"<?xml", "an XML document"),
               (b"{", "a JSON document"))
_TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"  # pickled 0x1950a86a20f9469cfc6c


def _amount(n: int) -> str:
    """``512 bytes``, ``1.2 kB``, ``3.4 MB``, ``1.1 GB``."""
    if n < 1000:
        return f"{n} bytes"
    for unit, scale in (("kB", 1e3), ("MB", 1e6), ("GB", 1e9)):
        if round(n / scale, 1) < 1000 or unit == "GB":
            return f"{n / scale:.1f} {unit}"


def _zip_names(path: Path) -> list[str] | None:
    """The members a zip archive's central directory lists; None if it is not a readable zip."""
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.namelist()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return None


def _tsv_problem(path: Path, n: int) -> str | None:
    if n > _MAX_TSV:
        return f"what arrived is too large for a stimulus list ({_amount(n)})"
    try:
        rows = [line for line in path.read_bytes().decode("utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        return f"what arrived is not a text file ({_amount(n)})"
    if not rows:
        return "what arrived is an empty list"
    bad = next((i for i, line in enumerate(rows, 1) if len(line.split("\t")) < 2), None)
    if bad is not None:
        return f"what arrived is not a tab-separated list ({_amount(n)}; line {bad} has no tab)"
    return None


def check_content(path, kind: str | None = None) -> str | None:
    """What is wrong with a downloaded file, given what it must hold; None if it looks right.

    Cheap: reads the file's first bytes and its HDF5 or zip structure, not its data.

    Parameters
    ----------
    path : path-like
        The file.
    kind : {"bdata", "hdf5", "zip", "torch", "mat", "tsv"} or None
        ``bdata``: an HDF5 file with the groups the BData reader needs (``dataset`` or ``dataSet``,
        ``metadata`` or ``metaData`` holding ``key`` and ``value``); ``hdf5``: an HDF5 file h5py
        opens; ``zip``: a zip archive whose central directory lists members (the members are checked
        when unpacked); ``torch``: a ``torch.save`` file (zip archive with ``data.pkl``, or the legacy
        pickle format); ``mat``: a MATLAB file (v5 header, or HDF5 for v7.3); ``tsv``: a UTF-8 text
        list whose every non-empty line has at least two tab-separated fields (a stimulus list).
        None: by the suffix of ``path`` (``.h5``, ``.zip``, ``.pt``, ``.mat``, ``.tsv`` ...); other
        files are not checked.

    Returns
    -------
    str or None
        What arrived, as a clause for an error message (``"the server sent a web page, not the
        file: an HTML page of 1.2 kB titled 'Not found'"``, ``"what arrived is not an HDF5 file
        (300.0 kB)"``), or None if the file passes.
    """
    path = Path(path)
    kind = kind or _KIND_BY_SUFFIX.get(path.suffix.lower())
    if kind is None:
        return None
    if kind not in _KINDS:
        raise ValueError(f"unknown content kind {kind!r}; use one of {', '.join(_KINDS)}")
    n = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4096)
    if not n:
        return "what arrived is an empty file"
    start = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    for prefix, what in _WEB_STARTS:
        if start.startswith(prefix):
            title = re.search(rb"<title[^>]*>([^<]{1,80})<", head, re.IGNORECASE)
            # the title says what the page is ("Not found", a portal's "Log in"); brackets would read as markup
            title = re.sub(r"[\s\[\]]+", " ", title[1].decode("utf-8", "replace")).strip() if title else ""
            return (f"the server sent a web page, not the file: {what} of {_amount(n)}"
                    + (f" titled {title!r}" if title else ""))
    if kind == "tsv":
        return _tsv_problem(path, n)
    if kind == "zip":
        names = _zip_names(path)
        if names is None:
            return f"what arrived is not a zip archive ({_amount(n)})"
        return None if names else "what arrived is an empty zip archive"
    if kind == "torch":   # torch.save: a zip archive holding <name>/data.pkl, or (before torch 1.6) a pickle
        if head.startswith(_TORCH_LEGACY_MAGIC) or any(m.rpartition("/")[2] == "data.pkl"
                                                        for m in _zip_names(path) or ()):
            return None
        return f"what arrived is not a PyTorch file ({_amount(n)})"
    if kind == "mat" and head.startswith(b"MATLAB 5.0 MAT-file"):
        return None
    if not h5py.is_hdf5(path):
        return f"what arrived is not {'a MATLAB' if kind == 'mat' else 'an HDF5'} file ({_amount(n)})"
    try:
        with h5py.File(path, "r") as f:
            if kind != "bdata":
                return None
            ds, md = f.get("dataset", f.get("dataSet")), f.get("metadata", f.get("metaData"))
            if isinstance(ds, h5py.Dataset) and isinstance(md, h5py.Group) and {"key", "value"} <= set(md):
                return None
            return (f"what arrived is an HDF5 file ({_amount(n)}) but not a BData file: it lacks /dataset and "
                    f"/metadata/key, /metadata/value (it holds {', '.join(sorted(f)) or 'nothing'})")
    except (OSError, RuntimeError, KeyError, ValueError) as e:   # a damaged file
        return f"what arrived is an HDF5 file ({_amount(n)}) that h5py cannot open ({e})"


def fetch(url: str, path, *, size: int | None = None, sha256: str | None = None, md5: str | None = None,
          kind: str | None = None, label: str | None = None, hint: str = "", page: str = "", progress=None,
          retries: int | None = None, timeout: float | None = None, log: Log = _quiet) -> Fetched:
    """Download ``url`` to ``path`` (via ``path.part``, resumable) and verify what is known of it.

    A file that is not what it must hold (``kind``, see ``check_content``; default: by the suffix
    of ``path``) or whose size or checksum differs is deleted and fetched once more from the start;
    a second failure raises ``DownloadError``. ``page``: where to fetch the file by hand, named in
    that error. ``progress``: a ``rich.progress.Progress`` to show a bar on.
    """
    path = Path(path)
    kind = kind or _KIND_BY_SUFFIX.get(path.suffix.lower())
    label = label or path.name
    retries = RETRIES if retries is None else retries
    timeout = TIMEOUT if timeout is None else timeout
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    meta = part.with_name(part.name + ".json")
    problem = wrong = None
    for attempt in (1, 2):
        _transfer(url, part, label=label, hint=hint, progress=progress, retries=retries, timeout=timeout, log=log)
        problem = wrong = check_content(part, kind)
        if wrong is None:
            got = file_digests(part)
            problem = _mismatch(got, size, sha256, md5)
        if problem is None:
            part.replace(path)
            meta.unlink(missing_ok=True)
            return Fetched(path, url, *got)
        part.unlink()
        meta.unlink(missing_ok=True)
        if attempt == 1:
            log(f"{label}: {wrong or f'damaged download ({problem})'}; deleted it, downloading again")
    if wrong:
        raise DownloadError(f"{url}: {wrong}, on both tries; the copy was deleted. Try again later, set {MIRROR_ENV} "
                            f"to a server holding a copy, or fetch the file by hand from {page or 'the dataset page'}")
    raise DownloadError(f"{url}: the download is damaged again ({problem}); the copy was deleted. The server's "
                        "file differs from the published one: try again later, or fetch it by hand from the "
                        "dataset page")


# ------------------------------------------------------------------------------------ file lists

@dataclass(frozen=True)
class ListedFile:
    """One file of a figshare article's public file list."""
    name: str
    file_id: int
    size: int | None
    md5: str | None
    download_url: str | None


def _listed(item: dict) -> ListedFile | None:
    name, fid = item.get("name"), item.get("id")
    if not isinstance(name, str) or not isinstance(fid, int) or isinstance(fid, bool):
        return None
    size = item.get("size")
    md5 = item.get("computed_md5") or item.get("supplied_md5")
    url = item.get("download_url")
    return ListedFile(name, fid, size if isinstance(size, int) and size >= 0 else None,
                      md5.lower() if isinstance(md5, str) and re.fullmatch(r"[0-9a-fA-F]{32}", md5) else None,
                      url if isinstance(url, str) and url.startswith(("http://", "https://")) else None)


def _read_api(url: str, article: int, timeout: float) -> bytes:
    """The body of an API response; a busy server or a broken connection is tried again (``RETRIES``)."""
    request = Request(url, headers={"User-Agent": USER_AGENT, "Accept": "application/json"})
    for attempt in range(RETRIES + 1):
        if attempt:
            time.sleep(RETRY_WAIT * attempt)
        try:
            with urlopen(request, timeout=timeout) as resp:
                return resp.read()
        except HTTPError as e:
            if (e.code == 429 or e.code >= 500) and attempt < RETRIES:
                continue
            raise DownloadError(f"{url}: HTTP {e.code} {e.reason} for the file list of figshare article {article}; "
                                f"{_http_advice(e.code, f'check {API_ENV} (unset: {FIGSHARE_API})')}") from None
        except (URLError, OSError, http.client.HTTPException) as e:
            if attempt < RETRIES:
                continue
            raise DownloadError(f"{url}: cannot connect ({getattr(e, 'reason', None) or e}) to read the file list "
                                f"of figshare article {article}; check the network connection, or set {MIRROR_ENV} "
                                "to a server holding copies of the files") from None
    raise AssertionError("unreachable")


def list_article_files(article: int, api: str | None = None, timeout: float | None = None) -> list[ListedFile]:
    """Every file of a figshare article's public file list (all pages of ``<api>/articles/<article>/files``).

    Parameters
    ----------
    article : int
        The figshare article id (7033577, 21564384).
    api : str, optional
        Base URL of the API; default ``$BRAINRECON_FIGSHARE_API``, else ``https://api.figshare.com/v2``.

    Returns
    -------
    list of ListedFile
        Name, file id, size in bytes, md5 and download URL of each file, in the list's order.
    """
    base = api_url(api) or FIGSHARE_API
    out: list[ListedFile] = []
    for page in range(1, MAX_PAGES + 1):
        url = f"{base}/articles/{article}/files?{urlencode({'page': page, 'page_size': PAGE_SIZE})}"
        body = _read_api(url, article, TIMEOUT if timeout is None else timeout)
        try:
            items = json.loads(body)
        except ValueError:
            items = None
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise DownloadError(f"{url}: what arrived is not a figshare file list (a JSON list of files); check "
                                f"{API_ENV} (unset: {FIGSHARE_API})")
        out += [f for f in map(_listed, items) if f is not None]
        if len(items) < PAGE_SIZE:
            return out
    raise DownloadError(f"{base}: the file list of figshare article {article} goes on past {MAX_PAGES} pages "
                        f"of {PAGE_SIZE}; check {API_ENV} (unset: {FIGSHARE_API})")


def resolve(artefact: Artefact, api: str | None = None, lists: dict | None = None) -> ListedFile:
    """The file list entry of an artefact whose figshare id is not known in advance (found by file name).

    ``lists``: file lists already read, by (API, article); filled in, so that one download command
    reads each article's list once. A name listed twice gives the newest upload (the highest id).
    """
    key = (api_url(api) or FIGSHARE_API, artefact.article)
    files = None if lists is None else lists.get(key)
    if files is None:
        files = list_article_files(artefact.article, api)
        if lists is not None:
            lists[key] = files
    hits = [f for f in files if f.name == artefact.file]
    if not hits:
        close = difflib.get_close_matches(artefact.file, [f.name for f in files], n=3, cutoff=0.6)
        near = f"; names close to it: {', '.join(close)}" if close else ""
        raise DownloadError(f"figshare article {artefact.article} lists no file named {artefact.file} "
                            f"({len(files)} files listed{near}): the file may have been renamed or withdrawn; "
                            f"look for it on {artefact.page} (and please report it), or set {MIRROR_ENV} to a "
                            "server holding a copy")
    return max(hits, key=lambda f: f.file_id)


@dataclass(frozen=True)
class _Source:
    """Where an artefact is fetched from and what the download must match."""
    url: str
    size: int | None
    md5: str | None
    listed: ListedFile | None = None


def _source(a: Artefact, mirror: str | None, api: str | None, lists: dict) -> _Source:
    """Known ids: the figshare URL (or the mirror). Ids resolved at download time: looked up in the
    article's file list, whose size and md5 the download must match; with a mirror and no API set,
    the mirror's copy is taken by name (checked for its content only)."""
    if not a.resolved_at_download or (mirror_url(mirror) and not api_url(api)):
        return _Source(a.url(mirror), a.size, a.md5)
    f = resolve(a, api, lists)
    url = a.url(mirror) if mirror_url(mirror) else (f.download_url or a.url(file_id=f.file_id))
    return _Source(url, a.size if a.size is not None else f.size, a.md5 or f.md5, f)


# ------------------------------------------------------------------------------------ archives

def _is_image(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_EXTENSIONS


def _member_parts(archive: Path, name: str, folder: Path) -> tuple[str, ...]:
    """Path components of an archive member; refuses names that would leave the unpack folder."""
    norm = name.replace("\\", "/")
    parts = tuple(p for p in PurePosixPath(norm).parts if p not in ("", "."))
    if norm.startswith("/") or (parts and ":" in parts[0]) or ".." in parts:
        raise DownloadError(f"{archive}: refusing to unpack: member {name!r} would be written outside {folder}; "
                            "the archive is damaged or not the published one: delete it and download again")
    return parts


def unpack_zip(archive, folder, expect=(), min_images: int = 0) -> dict[str, int]:
    """Unpack a zip into ``folder`` (replacing it) and check that the ``expect`` files are there
    (an entry ``a|b`` asks for either) and that it holds at least ``min_images`` image files.

    A single top-level folder in the archive is dropped, so ``x.zip`` holding ``x/a.pt`` and one
    holding ``a.pt`` both give ``folder/a.pt``. Returns ``{file relative to folder: size}``.
    """
    archive, folder = Path(archive), Path(folder)
    tmp = folder.with_name(f".{folder.name}.unpacking")
    with zipfile.ZipFile(archive) as zf:
        members = [i for i in zf.infolist() if not i.filename.startswith("__MACOSX/")]
        parts = [_member_parts(archive, i.filename, folder) for i in members]
        tops = {p[0] for p in parts if p}
        strip = int(len(tops) == 1 and any(len(p) > 1 or i.is_dir() for i, p in zip(members, parts) if p))
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        root = tmp.resolve()
        try:
            for info, p in zip(members, parts):
                p = p[strip:]
                if not p:
                    continue
                target = root.joinpath(*p)
                if not target.resolve().is_relative_to(root):
                    raise DownloadError(f"{archive}: refusing to unpack: member {info.filename!r} would be "
                                        f"written outside {folder}")
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, CHUNK)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    missing = [e.replace("|", " or ") for e in expect if not any((tmp / alt).is_file() for alt in e.split("|"))]
    if missing:
        found = sorted(q.relative_to(tmp).as_posix() for q in tmp.rglob("*") if q.is_file())
        shutil.rmtree(tmp, ignore_errors=True)
        raise DownloadError(f"{archive}: the archive lacks {', '.join(missing)} (it holds "
                            f"{', '.join(found[:6]) or 'nothing'}{', ...' if len(found) > 6 else ''}); "
                            "the published archive may have changed: please report it")
    n_images = sum(_is_image(q.name) for q in tmp.rglob("*") if q.is_file())
    if n_images < min_images:
        found = sorted(q.relative_to(tmp).as_posix() for q in tmp.rglob("*") if q.is_file())
        shutil.rmtree(tmp, ignore_errors=True)
        raise DownloadError(f"{archive}: the archive holds {n_images} image files, expected at least {min_images} "
                            f"(it holds {', '.join(found[:6]) or 'nothing'}{', ...' if len(found) > 6 else ''}); "
                            "the published archive may have changed: please report it")
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return {q.relative_to(folder).as_posix(): q.stat().st_size for q in sorted(folder.rglob("*")) if q.is_file()}


# ------------------------------------------------------------------------------------ manifest

def read_manifest(home) -> dict:
    """``{"artefacts": {name: record}}`` of a download folder (empty if none)."""
    data = _read_json(Path(home) / MANIFEST)
    if not isinstance(data.get("artefacts"), dict):
        data = {"artefacts": {}}
    return data


def _record(home: Path, rec: dict) -> None:
    data = read_manifest(home)
    data["artefacts"][rec["name"]] = rec
    _write_json(home / MANIFEST, data)


def is_complete(artefact: Artefact, home, manifest: dict | None = None) -> bool:
    """Recorded in the manifest (with the published checksums, if any) and its files present at their size;
    a plain file must also pass ``check_content`` (cheap: headers and structure, not a re-hash)."""
    home = Path(home)
    rec = (manifest or read_manifest(home))["artefacts"].get(artefact.name)
    if not isinstance(rec, dict) or not isinstance(rec.get("files"), dict):
        return False
    for key in ("sha256", "md5", "size"):
        want = getattr(artefact, key)
        if want and rec.get(key) != want:
            return False
    files = rec["files"]
    if not all(isinstance(n, int) and (home / rel).is_file() and (home / rel).stat().st_size == n
               for rel, n in files.items()):
        return False
    if not all(any(alt in files for alt in group) for group in artefact.expected()):
        return False
    if sum(map(_is_image, files)) < artefact.min_images:
        return False
    return artefact.unpack or check_content(home / artefact.relpath, artefact.kind) is None


def _hint(a: Artefact, mirror: str | None) -> str:
    if mirror_url(mirror):
        return f"the mirror has no {a.file}: copy it there, or unset {MIRROR_ENV} to use figshare"
    return f"look for {a.file} on {a.page}, or set {MIRROR_ENV} to a server holding a copy"


def _get(a: Artefact, home: Path, src: _Source, mirror: str | None, progress, keep_archive: bool, log: Log) -> dict:
    """Fetch (and unpack) one artefact from ``src``; returns its manifest record."""
    url = src.url
    path = home / a.relpath
    for attempt in (1, 2):
        got = fetch(url, path, size=src.size, sha256=a.sha256, md5=src.md5, kind=a.kind, label=a.name,
                    hint=_hint(a, mirror), page=a.page, progress=progress, log=log)
        files = {a.relpath: got.size}
        if not a.unpack:
            break
        try:
            inner = unpack_zip(path, home / a.unpack_dir, a.expect, a.min_images)
        except (zipfile.BadZipFile, zlib.error, EOFError) as e:
            path.unlink()
            if attempt == 2:
                raise DownloadError(f"{url}: not a valid zip archive ({e}) after a second download; the copy "
                                    "was deleted: try again later") from None
            log(f"{a.name}: damaged archive ({e}); deleted it, downloading again")
            continue
        files = {f"{a.unpack_dir}/{rel}": n for rel, n in inner.items()}
        if keep_archive:
            files[a.relpath] = got.size
        else:
            path.unlink()
        break
    rec = {"name": a.name, "url": url, "file": a.relpath, "size": got.size, "sha256": got.sha256,
           "md5": got.md5, "time": datetime.now(UTC).isoformat(timespec="seconds"), "files": files}
    if a.file_id is not None:
        rec["file_id"] = a.file_id
    if src.listed is not None:   # the id, size and md5 the article's file list gave
        rec["file_id"] = src.listed.file_id
        rec["listed"] = {"article": a.article, "file_id": src.listed.file_id, "size": src.listed.size,
                         "md5": src.listed.md5}
    return rec


def _adopt(a: Artefact, home: Path, log: Log, src: _Source | None = None) -> dict | None:
    """A plain file already in place (no manifest record) whose published checksum (or, for an id
    looked up in the file list, the listed md5 and size: ``src``) matches and whose content passes
    ``check_content``."""
    path = home / a.relpath
    size, md5 = (src.size, src.md5) if src is not None else (a.size, a.md5)
    if a.unpack or not (a.sha256 or md5) or not path.is_file() or check_content(path, a.kind):
        return None
    got = file_digests(path)
    if _mismatch(got, size, a.sha256, md5):
        return None
    log(f"{a.name}: found {path} with the published checksum; recorded it")
    rec = {"name": a.name, "url": src.url if src is not None else a.url(), "file": a.relpath, "size": got[0],
           "sha256": got[1], "md5": got[2], "time": datetime.now(UTC).isoformat(timespec="seconds"),
           "files": {a.relpath: got[0]}}
    if src is not None and src.listed is not None:
        rec["file_id"] = src.listed.file_id
        rec["listed"] = {"article": a.article, "file_id": src.listed.file_id, "size": src.listed.size,
                         "md5": src.listed.md5}
    return rec


def _progress_bar():
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeRemainingColumn(), console=Console(stderr=True))


def download(names, dest=None, *, mirror: str | None = None, api: str | None = None, force: bool = False,
             progress: bool = True, keep_archives: bool = False, log: Log | None = None) -> list[Path]:
    """Fetch artefacts by name (entries, groups such as ``paper-subject1``, prefixes such as
    ``fmri/sub-01``) into ``dest`` (default ``default_home()``); returns the files they provide
    (for an archive of stimulus images, the folder it is unpacked into).

    Recorded, complete artefacts are skipped unless ``force``. ``mirror``: base URL serving the
    files by name (default ``$BRAINRECON_MIRROR``, else figshare). ``api``: base URL of the figshare
    API whose article file lists give the ids, sizes and md5 sums of the entries without a known id
    (default ``$BRAINRECON_FIGSHARE_API``, else ``https://api.figshare.com/v2``; with a mirror and
    neither set, those files are taken from the mirror by name, checked for their content only).
    """
    log = log or _quiet
    items = expand(names)
    home = Path(dest).expanduser() if dest is not None else default_home()
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(f"{home}: cannot create the download folder ({e.strerror or e}); "
                            "choose another with --dest or $BRAINRECON_HOME") from None
    bar = _progress_bar() if progress else None
    lists: dict = {}   # article file lists read so far
    with bar if bar is not None else nullcontext():
        for a in items:
            manifest = read_manifest(home)
            if not force and is_complete(a, home, manifest):
                log(f"{a.name}: already downloaded")
                continue
            try:
                src = _source(a, mirror, api, lists)
                rec = None if force else _adopt(a, home, log, src)
                fetched = rec is None
                if fetched:
                    rec = _get(a, home, src, mirror, bar, keep_archives, log)
            except DownloadError as e:
                raise DownloadError(f"{a.name}: {e}") from None
            if fetched:
                log(f"{a.name}: done ({_mb(rec['size'])})")
            _record(home, rec)
    return [p for a in items for p in a.paths(home)]


def describe(dest=None) -> str:
    """The artefacts and groups as text, with what is already in the download folder."""
    home = Path(dest).expanduser() if dest is not None else default_home()
    manifest = read_manifest(home)
    width = max(map(len, list(ARTEFACTS) + list(GROUPS)))
    lines = [f"download folder: {home}", "", "artefacts:"]
    for a in ARTEFACTS.values():
        marks = ["[id from the file list]" if a.resolved_at_download else "",
                 "[downloaded]" if is_complete(a, home, manifest) else ""]
        lines.append(f"  {a.name:<{width}}  {a.description} {' '.join(m for m in marks if m)}".rstrip())
    lines += ["", f"[id from the file list]: the figshare file id is looked up by name in the article's public "
                  f"file list at download time ({FIGSHARE_API}/articles/<id>/files; {API_ENV} sets another "
                  "server), and the download is checked against the size and md5 listed there"]
    lines += ["", "groups (a prefix such as fmri/sub-01 also names everything below it):"]
    lines += [f"  {g:<{width}}  {GROUP_HELP.get(g, ', '.join(GROUPS[g]))}" for g in GROUPS]
    return "\n".join(lines)


def missing_artefact_hint(paths, home=None) -> str | None:
    """For missing files, the ``brainrecon download`` command(s) that provide them (matched by file
    name), with ``--dest`` where the paths follow the download layout under another folder; None if
    no file matches."""
    home = Path(home).expanduser() if home is not None else default_home()
    by_dest: dict[str, list[str]] = {}
    elsewhere = []
    for p in paths:
        p = Path(p).expanduser()
        hits = find_by_filename(p.name)
        if not hits:
            continue
        a, rel = hits[0]
        posix = p.as_posix()
        if posix.endswith("/" + rel):
            dest = Path(posix[:-len(rel) - 1] or "/")
            key = "" if dest.resolve() == home.resolve() else str(dest)
        else:
            key = ""
            elsewhere.append(p.name)
        names = by_dest.setdefault(key, [])
        if a.name not in names:
            names.append(a.name)
    if not by_dest:
        return None
    text = " ; ".join(f"brainrecon download {' '.join(n)}" + (f" --dest {d}" if d else "")
                      for d, n in by_dest.items())
    if elsewhere:
        text += f" (it saves {', '.join(elsewhere)} under {home}: point the paths there)"
    return text
