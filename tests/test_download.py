"""`brainrecon download` against a local HTTP server: resume, verification, errors, archives, manifest,
and every registry entry fetched and loaded the way a user's run loads it."""
from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import socket
import threading
import zipfile
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import h5py
import numpy as np
import pytest
import scipy.io
import torch
from typer.testing import CliRunner

from brainrecon.cli import app
from brainrecon.data import download as dl
from brainrecon.data import registry
from brainrecon.data.bdata import BData, name_to_stimulus_id, read_fmri, write_bdata
from brainrecon.data.download import (DownloadError, check_content, download, fetch, missing_artefact_hint,
                                      unpack_zip)
from brainrecon.data.registry import ARTEFACTS, Artefact, expand
from brainrecon.nets import load_network
from brainrecon.nets.feature_sd import FEATURE_SD_FILE, VGG19_CHANNELS, load_feature_sd

runner = CliRunner()


def _flat(text: str) -> str:
    """Text without whitespace: the console wraps and folds long messages."""
    return "".join(text.split())
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


# ----------------------------------------------------------------------------------- test server

class _Handler(BaseHTTPRequestHandler):
    """Serves ``server.root`` by file name (``/<name>``, as a mirror) and by figshare file id
    (``/files/<id>``), with Range support and per-file failure modes, and the figshare API's
    paginated article file lists (``/articles/<id>/files?page=&page_size=``)."""
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        fx = self.server.fixture
        url = urlsplit(self.path)
        listing = re.fullmatch(r"/articles/(\d+)/files", url.path)
        by_id = re.fullmatch(r"/files/(\d+)", url.path)
        name = (f"articles/{listing[1]}/files" if listing else fx.ids.get(int(by_id[1]), "?") if by_id
                else unquote(url.path.lstrip("/")))
        modes = fx.modes.get(name) or []
        mode = modes.pop(0) if modes else "ok"
        rec = {"path": name, "url": self.path, "range": self.headers.get("Range"), "mode": mode, "status": None,
               "sent": 0}
        fx.requests.append(rec)
        if listing:
            return self._file_list(rec, int(listing[1]), parse_qs(url.query), mode)
        path = fx.root / name
        if mode == "404" or not path.is_file():
            return self._reply(rec, 404, b"not found")
        size = path.stat().st_size
        start, end, status = 0, size - 1, 200
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", rec["range"] or "")
        if m and mode != "norange":
            start, end, status = int(m[1]), int(m[2]) if m[2] else size - 1, 206
            if start >= size:
                return self._reply(rec, 416, b"", {"Content-Range": f"bytes */{size}"})
        with open(path, "rb") as f:
            f.seek(start)
            body = f.read(end - start + 1)
        if mode == "other":   # another version of the file than the one listed (same size, valid content)
            body = fx.other[name][start:end + 1]
        if mode == "corrupt":
            body = bytes(b ^ 0xFF for b in body[:64]) + body[64:]
        headers = {"Accept-Ranges": "bytes", "ETag": f'"{size}"'}
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        if mode == "cut":   # announce everything, send half, drop the connection
            self._reply(rec, status, body, headers, send=len(body) // 2)
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self._reply(rec, status, body, headers)

    def _file_list(self, rec, article, query, mode):
        items = self.server.fixture.articles.get(article)
        if mode == "404" or items is None:
            return self._reply(rec, 404, b'{"message": "Entity not found: article", "code": "EntityNotFound"}')
        if mode == "html":
            return self._reply(rec, 200, _HTML, {"Content-Type": "text/html"})
        if mode == "busy":
            return self._reply(rec, 503, b"Service Unavailable")
        page, size = int(query.get("page", ["1"])[0]), int(query.get("page_size", ["10"])[0])
        rec["page"], rec["page_size"] = page, size
        body = json.dumps(items[(page - 1) * size:page * size]).encode()
        self._reply(rec, 200, body, {"Content-Type": "application/json"})

    def _reply(self, rec, status, body, headers=None, send=None):
        rec["status"] = status
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        part = body if send is None else body[:send]
        self.wfile.write(part)
        self.wfile.flush()
        rec["sent"] = len(part)


class FixtureServer:
    def __init__(self, root: Path):
        self.root = root
        self.modes: dict[str, list[str]] = {}
        self.requests: list[dict] = []
        self.articles: dict[int, list[dict]] = {}   # figshare article id -> its public file list
        self.ids: dict[int, str] = {}               # figshare file id -> file name under root
        self.other: dict[str, bytes] = {}           # file name -> another version, served in mode "other"
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.fixture = self
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    monkeypatch.setenv("BRAINRECON_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("BRAINRECON_MIRROR", raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    srv = FixtureServer(root)
    yield srv
    srv.close()


def _blob(server, name="blob.bin", n=300_000, seed=0) -> bytes:
    data = np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()
    (server.root / name).write_bytes(data)
    return data


def _register(monkeypatch, name="test/blob", file="blob.bin", **kw) -> Artefact:
    a = Artefact(name=name, file=file, file_id=1, base_url="http://invalid.test/files", page="http://invalid.test",
                 folder=kw.pop("folder", "fmri"), description="test file", **kw)
    monkeypatch.setitem(registry.ARTEFACTS, name, a)
    return a


# ----------------------------------------------------------------------------------- registry

def test_registry_names_urls_and_groups(monkeypatch):
    # 3 subjects x (natural training + test, shapes, letters, imagery; fMRIPrep natural training + test,
    # shapes, imagery), 4 stimulus lists, 2 stimulus archives, 2 networks
    assert len(ARTEFACTS) == 3 * 9 + 4 + 2 + 2
    a = ARTEFACTS["fmri/sub-01/perception-natural-training"]
    assert a.url() == "https://ndownloader.figshare.com/files/14830643"
    assert a.file == "sub-01_perceptionNaturalImageTraining_original_VC.h5"
    assert ARTEFACTS["fmri/sub-03/fmriprep-test"].url() == "https://figshare.com/ndownloader/files/37849986"
    vgg = ARTEFACTS["vgg19-caffe"]
    assert vgg.url() == "https://figshare.com/ndownloader/files/38225868" and vgg.unpack
    assert ARTEFACTS["generator-relu7"].url().endswith("/38361230")
    assert vgg.url("http://127.0.0.1:9/") == "http://127.0.0.1:9/VGG_ILSVRC_19_layers.zip"
    # the other experiments: ids looked up in the article's file list, except the one published
    shapes = ARTEFACTS["fmri/sub-02/perception-shapes"]
    assert shapes.file == "sub-02_perceptionArtificialImage_original_VC.h5" and shapes.article == 7033577
    assert shapes.resolved_at_download and shapes.kind == "bdata"
    assert ARTEFACTS["fmri/sub-03/imagery"].file == "sub-03_imagery_original_VC.h5"
    assert ARTEFACTS["fmri/sub-01/perception-letters"].file == "sub-01_perceptionLetterImage_original_VC.h5"
    assert ARTEFACTS["fmri/sub-02/fmriprep-imagery"].file == "sub-02_Imagery_fmriprep_volume_native.h5"
    known = ARTEFACTS["fmri/sub-01/fmriprep-shapes"]
    assert known.url().endswith("/37838487") and known.md5 == "2899d192ffd55973d08d420d20a6c401"
    assert ARTEFACTS["fmri/sub-02/fmriprep-shapes"].resolved_at_download
    assert not any(k.endswith("fmriprep-letters") for k in ARTEFACTS)   # no such release file
    with pytest.raises(ValueError, match="file list of figshare article 7033577"):
        shapes.url()
    assert shapes.url(file_id=5) == "https://ndownloader.figshare.com/files/5"
    ids = {n: ARTEFACTS[n].url().rsplit("/", 1)[1] for n in
           ("stimuli/shapes-images", "stimuli/letters-images", "stimuli/natural-training-list",
            "stimuli/natural-test-list", "stimuli/letters-list", "stimuli/shapes-list")}
    assert ids == {"stimuli/shapes-images": "14876801", "stimuli/letters-images": "14876735",
                   "stimuli/natural-training-list": "14876741", "stimuli/natural-test-list": "14876738",
                   "stimuli/letters-list": "14876732", "stimuli/shapes-list": "14876798"}
    assert ARTEFACTS["stimuli/shapes-images"].min_images == 40 and ARTEFACTS["stimuli/letters-list"].kind == "tsv"
    monkeypatch.setenv("BRAINRECON_MIRROR", "http://mirror.example/dir")
    assert a.url() == "http://mirror.example/dir/" + a.file and shapes.url() == "http://mirror.example/dir/" + shapes.file
    assert [x.name for x in expand(["fmri/sub-02"])] == [
        "fmri/sub-02/perception-natural-training", "fmri/sub-02/perception-natural-test",
        "fmri/sub-02/perception-shapes", "fmri/sub-02/perception-letters", "fmri/sub-02/imagery",
        "fmri/sub-02/fmriprep-training", "fmri/sub-02/fmriprep-test", "fmri/sub-02/fmriprep-shapes",
        "fmri/sub-02/fmriprep-imagery"]
    # paper-subject1: the four experiments of subject 1, the stimuli, the networks
    assert [x.name for x in expand(["paper-subject1", "vgg19-caffe"])] == [
        "fmri/sub-01/perception-natural-training", "fmri/sub-01/perception-natural-test",
        "fmri/sub-01/perception-shapes", "fmri/sub-01/perception-letters", "fmri/sub-01/imagery",
        "stimuli/natural-training-list", "stimuli/natural-test-list", "stimuli/shapes-list", "stimuli/letters-list",
        "stimuli/shapes-images", "stimuli/letters-images", "vgg19-caffe", "generator-relu7"]
    assert len(expand(["all"])) == len(ARTEFACTS) and len(expand(["paper"])) == 3 * 5 + 6 + 2
    assert len(expand(["fmriprep"])) == 3 * 4 and len(expand(["stimuli"])) == 6
    with pytest.raises(registry.RegistryError, match="did you mean.*fmri/sub-01.*--list"):
        expand(["fmri/sub-1"])
    listing = runner.invoke(app, ["download", "--list"]).output
    for name in ARTEFACTS:
        assert re.search(rf"^  {re.escape(name)} ", listing, re.M), name
    marked = {line.split()[0] for line in listing.splitlines() if "[id from the file list]" in line and
              line.startswith("  ")}
    assert marked == {n for n, x in ARTEFACTS.items() if x.resolved_at_download} and len(marked) == 3 * 3 + 3 + 2


# ----------------------------------------------------------------------------------- transfers

def test_normal_fetch_and_manifest(server, monkeypatch, tmp_path):
    data = _blob(server)
    _register(monkeypatch, sha256=hashlib.sha256(data).hexdigest())
    home = tmp_path / "home"
    paths = download(["test/blob"], mirror=server.url, progress=False)
    assert paths == [home / "fmri" / "blob.bin"] and paths[0].read_bytes() == data
    assert not list(home.rglob("*.part*"))
    rec = json.loads((home / "manifest.json").read_text())["artefacts"]["test/blob"]
    assert rec["url"] == f"{server.url}/blob.bin" and rec["size"] == len(data)
    assert rec["sha256"] == hashlib.sha256(data).hexdigest() and rec["md5"] == hashlib.md5(data).hexdigest()
    assert rec["files"] == {"fmri/blob.bin": len(data)} and re.match(r"\d{4}-\d\d-\d\dT", rec["time"])
    # complete: not fetched again
    n = len(server.requests)
    download(["test/blob"], mirror=server.url, progress=False)
    assert len(server.requests) == n
    # a file gone (or changed size) is fetched again
    paths[0].write_bytes(data[:10])
    download(["test/blob"], mirror=server.url, progress=False)
    assert len(server.requests) == n + 1 and paths[0].read_bytes() == data


def test_interrupted_transfer_resumes_with_range(server, monkeypatch):
    data = _blob(server)
    _register(monkeypatch)
    server.modes["blob.bin"] = ["cut"]
    msgs = []
    [path] = download(["test/blob"], mirror=server.url, progress=False, log=msgs.append)
    assert path.read_bytes() == data
    first, second = server.requests
    half = len(data) // 2
    assert first["range"] is None and first["sent"] == half
    assert second["range"] == f"bytes={half}-" and second["status"] == 206 and second["sent"] == len(data) - half
    assert any("interrupted" in m and "resuming" in m for m in msgs)


def test_interrupted_run_resumes_on_the_next_command(server, monkeypatch, tmp_path):
    data = _blob(server)
    _register(monkeypatch)
    monkeypatch.setattr(dl, "RETRIES", 0)
    server.modes["blob.bin"] = ["cut"]
    with pytest.raises(DownloadError, match="interrupted after .* run the same command again to resume"):
        download(["test/blob"], mirror=server.url, progress=False)
    part = tmp_path / "home" / "fmri" / "blob.bin.part"
    assert part.stat().st_size == len(data) // 2
    result = runner.invoke(app, ["download", "test/blob"], env={"BRAINRECON_MIRROR": server.url})
    assert result.exit_code == 0, result.output
    assert server.requests[-1]["range"] == f"bytes={len(data) // 2}-" and server.requests[-1]["status"] == 206
    assert (tmp_path / "home" / "fmri" / "blob.bin").read_bytes() == data and not part.exists()


def test_server_ignoring_range_gives_a_full_download(server, monkeypatch, tmp_path):
    data = _blob(server)
    _register(monkeypatch)
    server.modes["blob.bin"] = ["cut", "norange"]
    msgs = []
    [path] = download(["test/blob"], mirror=server.url, progress=False, log=msgs.append)
    assert path.read_bytes() == data
    assert server.requests[1]["range"] and server.requests[1]["status"] == 200
    assert any("whole file" in m for m in msgs)


def test_corrupted_download_is_refetched_once_then_fails(server, monkeypatch, tmp_path):
    data = _blob(server)
    _register(monkeypatch, sha256=hashlib.sha256(data).hexdigest())
    server.modes["blob.bin"] = ["corrupt"]
    msgs = []
    [path] = download(["test/blob"], mirror=server.url, progress=False, log=msgs.append)
    assert path.read_bytes() == data and len(server.requests) == 2
    assert server.requests[1]["range"] is None and any("damaged" in m for m in msgs)
    # damaged twice: a clear error, nothing left behind
    _register(monkeypatch, name="test/bad", file="bad.bin", md5=hashlib.md5(data).hexdigest())
    shutil.copy(server.root / "blob.bin", server.root / "bad.bin")
    server.modes["bad.bin"] = ["corrupt", "corrupt"]
    with pytest.raises(DownloadError, match=r"test/bad: .*/bad.bin: the download is damaged again \(md5 "):
        download(["test/bad"], mirror=server.url, progress=False)
    assert not list((tmp_path / "home" / "fmri").glob("bad.bin*"))


def test_http_errors_name_the_url_and_the_fix(server, monkeypatch):
    _register(monkeypatch, name="test/gone", file="gone.bin")
    with pytest.raises(DownloadError) as e:
        download(["test/gone"], mirror=server.url, progress=False)
    msg = str(e.value)
    assert f"{server.url}/gone.bin: HTTP 404" in msg and "the mirror has no gone.bin" in msg and "\n" not in msg
    with pytest.raises(DownloadError, match="HTTP 404 .* look for x.bin on https://figshare"):
        fetch(f"{server.url}/x.bin", Path(server.root.parent / "x.bin"),
              hint="look for x.bin on https://figshare.com/articles/dataset/7033577")
    result = runner.invoke(app, ["download", "test/gone"], env={"BRAINRECON_MIRROR": server.url})
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "HTTP404" in _flat(result.output) and "themirrorhasnogone.bin" in _flat(result.output)
    # a server that cannot be reached
    port = server.httpd.server_address[1]
    server.close()
    monkeypatch.setattr(dl, "RETRIES", 0)
    with pytest.raises(DownloadError, match=rf"127.0.0.1:{port}/gone.bin: cannot connect .* BRAINRECON_MIRROR"):
        download(["test/gone"], mirror=f"http://127.0.0.1:{port}", progress=False)


# ----------------------------------------------------------------------------------- figshare file lists

def _publish(server, article: int, names, filler: int = 0, first_id: int = 90_000_000) -> dict[str, int]:
    """List files of ``server.root`` (with size and md5) in a figshare-style article file list, with
    ``filler`` other files before them; returns {name: file id}."""
    items, ids = [], {}
    for i in range(filler):
        items.append({"id": first_id - 1 - i, "name": f"decodedfeatures-other-{i:03d}.zip", "size": 10,
                      "is_link_only": False, "download_url": f"{server.url}/files/{first_id - 1 - i}",
                      "supplied_md5": "", "computed_md5": "0" * 32, "mimetype": "application/zip"})
    for i, name in enumerate(names):
        data = (server.root / name).read_bytes()
        fid = first_id + i
        server.ids[fid], ids[name] = name, fid
        items.append({"id": fid, "name": name, "size": len(data), "is_link_only": False,
                      "download_url": f"{server.url}/files/{fid}", "supplied_md5": "",
                      "computed_md5": hashlib.md5(data).hexdigest(), "mimetype": "application/x-hdf5"})
    server.articles.setdefault(article, []).extend(items)
    return ids


def _list_pages(server) -> list[tuple[str, int]]:
    return [(r["path"], r["page"]) for r in server.requests if r["path"].startswith("articles/")]


_IMAGERY = "fmri/sub-01/imagery"
_LETTERS = "fmri/sub-01/perception-letters"


def test_ids_are_resolved_from_the_paginated_file_list(server, monkeypatch, tmp_path):
    """An entry without a known id: its article's file list is read page by page (once per command),
    the file is fetched from the listed URL, checked against the listed size and md5, and recorded
    with its id; a complete one is not looked up again."""
    monkeypatch.setattr(dl, "PAGE_SIZE", 3)
    imagery, letters = ARTEFACTS[_IMAGERY], ARTEFACTS[_LETTERS]
    labels = _fmri_fixture(server.root / imagery.file, False, False, 3)
    _fmri_fixture(server.root / letters.file, False, False, 4)
    ids = _publish(server, 7033577, [imagery.file, letters.file], filler=5)   # 7 files: pages of 3, 3, 1
    home = tmp_path / "home"
    paths = download([_IMAGERY, _LETTERS], api=server.url, progress=False)
    assert paths == [home / imagery.relpath, home / letters.relpath]
    assert _list_pages(server) == [("articles/7033577/files", 1), ("articles/7033577/files", 2),
                                   ("articles/7033577/files", 3)]   # one reading serves both entries
    assert all(r["page_size"] == 3 for r in server.requests if "page_size" in r)
    fetched = [r["url"] for r in server.requests if not r["path"].startswith("articles/")]
    assert fetched == [f"/files/{ids[imagery.file]}", f"/files/{ids[letters.file]}"]
    assert read_fmri(paths[0], "ROI_VC").labels == labels
    rec = dl.read_manifest(home)["artefacts"][_IMAGERY]
    data = paths[0].read_bytes()
    assert rec["file_id"] == ids[imagery.file] and rec["url"] == f"{server.url}/files/{ids[imagery.file]}"
    assert rec["listed"] == {"article": 7033577, "file_id": ids[imagery.file], "size": len(data),
                             "md5": hashlib.md5(data).hexdigest()}
    assert rec["md5"] == hashlib.md5(data).hexdigest() and rec["size"] == len(data)
    n = len(server.requests)
    result = runner.invoke(app, ["download", _IMAGERY], env={"BRAINRECON_FIGSHARE_API": server.url})
    assert result.exit_code == 0 and "already downloaded" in result.output and len(server.requests) == n
    listing = runner.invoke(app, ["download", "--list"]).output
    assert re.search(rf"{_IMAGERY} .*\[id from the file list\] \[downloaded\]", listing), listing
    # a file already in place with the listed md5 is recorded without downloading it
    other_home = tmp_path / "placed"
    (other_home / "fmri").mkdir(parents=True)
    shutil.copy(server.root / imagery.file, other_home / imagery.relpath)
    server.requests.clear()
    msgs = []
    download([_IMAGERY], other_home, api=server.url, progress=False, log=msgs.append)
    assert [r["path"] for r in server.requests] == ["articles/7033577/files"] * 3
    assert any("found" in m and "recorded it" in m for m in msgs)
    assert dl.read_manifest(other_home)["artefacts"][_IMAGERY]["file_id"] == ids[imagery.file]
    # the same through the command line, the API set by the environment
    result = runner.invoke(app, ["download", _LETTERS, "--dest", str(tmp_path / "cli")],
                           env={"BRAINRECON_FIGSHARE_API": server.url})
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cli" / letters.relpath).read_bytes() == (server.root / letters.file).read_bytes()
    assert _list_pages(server)[-3:] == [("articles/7033577/files", p) for p in (1, 2, 3)]


def test_resolved_file_resumes_and_a_wrong_version_is_refused(server, monkeypatch, tmp_path):
    imagery = ARTEFACTS[_IMAGERY]
    _fmri_fixture(server.root / imagery.file, False, False, 3)
    [fid] = _publish(server, 7033577, [imagery.file]).values()
    # interrupted: resumed with a Range request on the listed URL
    server.modes[imagery.file] = ["cut"]
    msgs = []
    [path] = download([_IMAGERY], api=server.url, progress=False, log=msgs.append)
    got = [r for r in server.requests if r["url"] == f"/files/{fid}"]
    size = (server.root / imagery.file).stat().st_size
    assert [r["range"] for r in got] == [None, f"bytes={size // 2}-"] and got[1]["status"] == 206
    assert path.read_bytes() == (server.root / imagery.file).read_bytes()
    assert any("interrupted" in m and "resuming" in m for m in msgs)
    # another version than the listed one (a valid BData file: only the md5 tells): deleted, fetched again
    other = tmp_path / "other.h5"
    _fmri_fixture(other, False, False, 9)
    server.other[imagery.file] = other.read_bytes()
    assert len(server.other[imagery.file]) == size   # same layout, other values: only the md5 differs
    server.requests.clear()
    server.modes[imagery.file] = ["other"]
    msgs = []
    download([_IMAGERY], api=server.url, progress=False, force=True, log=msgs.append)
    assert [r["mode"] for r in server.requests if r["url"] == f"/files/{fid}"] == ["other", "ok"]
    assert path.read_bytes() == (server.root / imagery.file).read_bytes()
    assert any("damaged download (md5 " in m and "downloading again" in m for m in msgs), msgs
    # wrong twice: one clear error naming the listed md5, nothing kept
    path.unlink()
    server.modes[imagery.file] = ["other", "other"]
    listed = hashlib.md5((server.root / imagery.file).read_bytes()).hexdigest()
    with pytest.raises(DownloadError, match=rf"{_IMAGERY}: .*/files/{fid}: the download is damaged again "
                                            rf"\(md5 [0-9a-f]+, expected {listed}\)"):
        download([_IMAGERY], api=server.url, progress=False)
    assert not list((tmp_path / "home" / "fmri").glob("sub-01_imagery*"))


def test_file_list_without_the_file_or_unreadable(server, monkeypatch, tmp_path):
    imagery = ARTEFACTS[_IMAGERY]
    _fmri_fixture(server.root / "sub-01_Imagery_original_VC.h5", False, False, 3)
    _publish(server, 7033577, ["sub-01_Imagery_original_VC.h5"], filler=4)
    with pytest.raises(DownloadError) as e:
        download([_IMAGERY], api=server.url, progress=False)
    msg = str(e.value)
    assert msg.startswith(f"{_IMAGERY}: figshare article 7033577 lists no file named {imagery.file} (5 files "
                          "listed; names close to it: sub-01_Imagery_original_VC.h5)"), msg
    assert imagery.page in msg and "BRAINRECON_MIRROR" in msg and "\n" not in msg
    result = runner.invoke(app, ["download", _IMAGERY], env={"BRAINRECON_FIGSHARE_API": server.url})
    assert result.exit_code == 2 and result.output.count("error:") == 1, result.output
    assert "Traceback" not in result.output
    assert _flat(f"lists no file named {imagery.file}") in _flat(result.output)
    assert not (tmp_path / "home" / "fmri").exists() or not list((tmp_path / "home" / "fmri").iterdir())
    # an article the API does not know, and something that is not a file list
    server.articles[7033577] = None
    with pytest.raises(DownloadError, match=r"articles/7033577/files\?page=1&page_size=100: HTTP 404 .* file list "
                                            r"of figshare article 7033577; .*BRAINRECON_FIGSHARE_API"):
        download([_IMAGERY], api=server.url, progress=False)
    server.articles[7033577] = []
    server.modes["articles/7033577/files"] = ["html"]
    with pytest.raises(DownloadError, match="what arrived is not a figshare file list"):
        download([_IMAGERY], api=server.url, progress=False)
    # a busy API is asked again; one that cannot be reached ends with one message
    server.modes["articles/7033577/files"] = ["busy"]
    monkeypatch.setattr(dl, "RETRY_WAIT", 0.0)
    with pytest.raises(DownloadError, match="lists no file named"):
        download([_IMAGERY], api=server.url, progress=False)
    assert [r["status"] for r in server.requests[-2:]] == [503, 200]
    monkeypatch.setattr(dl, "RETRIES", 0)
    with pytest.raises(DownloadError, match=r"127.0.0.1:9/articles/7033577/files\?page=1&page_size=100: cannot "
                                            r"connect .* file list of figshare article 7033577; .*BRAINRECON_MIRROR"):
        download([_IMAGERY], api="http://127.0.0.1:9", progress=False)
    # with a mirror and no API set, the mirror's copy is taken by name (no file list is read)
    shutil.copy(server.root / "sub-01_Imagery_original_VC.h5", server.root / imagery.file)
    server.requests.clear()
    [path] = download([_IMAGERY], mirror=server.url, progress=False)
    assert path.is_file() and [r["path"] for r in server.requests] == [imagery.file]
    assert "listed" not in dl.read_manifest(tmp_path / "home")["artefacts"][_IMAGERY]


# ----------------------------------------------------------------------------------- content checks

_HTML = (b"<!DOCTYPE html>\n<html><head><title>File not found [figshare]</title></head>"
         b"<body><h1>Sorry, the file could not be found.</h1>" + b" " * 1000 + b"</body></html>\n")
_PERCEPTION = "fmri/sub-01/perception-natural-test"   # no published checksum: only the content check guards it


def _small_bdata(path: Path) -> Path:
    b = BData()
    b.add(np.arange(12.0).reshape(4, 3), "VoxelData")
    write_bdata(path, b)
    return path


def test_check_content_by_kind(tmp_path):
    """Each kind passes a real file of its kind and names what arrived otherwise."""
    junk = np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes()

    def file(name, data=junk):
        (tmp_path / name).write_bytes(data)
        return tmp_path / name

    bd = _small_bdata(tmp_path / "ok.h5")
    assert check_content(bd, "bdata") is None and check_content(bd) is None
    with h5py.File(tmp_path / "plain.h5", "w") as f:
        f["other"] = np.zeros(3)
    assert check_content(tmp_path / "plain.h5") is None   # .h5 by its name: any HDF5 file
    assert re.fullmatch(r"what arrived is an HDF5 file \(.* kB\) but not a BData file: .*\(it holds other\)",
                        check_content(tmp_path / "plain.h5", "bdata"))
    assert check_content(file("junk.h5"), "bdata") == "what arrived is not an HDF5 file (3.0 kB)"
    assert "that h5py cannot open" in check_content(file("cut.h5", bd.read_bytes()[:1500]), "bdata")
    assert check_content(file("page.h5", _HTML)) == ("the server sent a web page, not the file: an HTML page of "
                                                     "1.1 kB titled 'File not found figshare'")
    assert check_content(file("e.h5", b'  {"message": "Not found"}')).startswith(
        "the server sent a web page, not the file: a JSON document of 26 bytes")
    assert check_content(file("empty.h5", b"")) == "what arrived is an empty file"
    assert check_content(_zip(tmp_path / "ok.zip", {"a.txt": b"a"})) is None
    assert check_content(file("junk.zip")) == "what arrived is not a zip archive (3.0 kB)"
    torch.save({"w": torch.zeros(2)}, tmp_path / "ok.pt")
    torch.save({"w": torch.zeros(2)}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    assert check_content(tmp_path / "ok.pt") is None and check_content(tmp_path / "legacy.pth") is None
    assert check_content(file("junk.pt")) == "what arrived is not a PyTorch file (3.0 kB)"
    assert check_content(_zip(tmp_path / "notorch.pt", {"a.txt": b"a"})).startswith("what arrived is not a PyTorch")
    scipy.io.savemat(tmp_path / "ok.mat", {"x": np.ones(3)})
    assert check_content(tmp_path / "ok.mat") is None and check_content(tmp_path / "plain.h5", "mat") is None
    assert check_content(file("junk.mat")) == "what arrived is not a MATLAB file (3.0 kB)"
    assert check_content(file("blob.bin")) is None   # no kind: not checked
    # stimulus lists: tab-separated text
    assert check_content(_stimulus_list(tmp_path / "ok.tsv", SHAPE_NAMES)) is None
    assert check_content(file("spaces.tsv", b"colorExpStim01_red_square 1\n")) == (
        "what arrived is not a tab-separated list (28 bytes; line 1 has no tab)")
    assert check_content(file("bin.tsv")) == "what arrived is not a text file (3.0 kB)"
    assert check_content(file("page.tsv", _HTML)).startswith("the server sent a web page, not the file: an HTML")
    assert check_content(file("blank.tsv", b"\n\n")) == "what arrived is an empty list"


def _serve_wrong(server, monkeypatch, case: str) -> tuple[str, Path]:
    """Serve something that is not the file for an artefact without a checksum: (name, served file)."""
    junk = np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    if case in ("h5-junk", "h5-html", "h5-not-bdata"):
        name, file = _PERCEPTION, ARTEFACTS[_PERCEPTION].file
    elif case == "zip-junk":
        name, file = "test/pack", "pack.zip"
        _register(monkeypatch, name=name, file=file, folder="models", unpack=True, expect=("a.pt",))
    else:   # no registry entry is a plain .pt file: a test one
        name, file = "test/weights", "weights.pt"
        _register(monkeypatch, name=name, file=file, folder="models")
    served = server.root / file
    if case == "h5-not-bdata":
        with h5py.File(served, "w") as f:
            f["images"] = np.zeros((2, 2))
    else:
        served.write_bytes(_HTML if case == "h5-html" else junk)
    return name, served


@pytest.mark.parametrize("case, arrived", [pytest.param(c, m, id=c) for c, m in (
    ("h5-junk", "what arrived is not an HDF5 file (5.0 kB)"),
    ("h5-html", "the server sent a web page, not the file: an HTML page of 1.1 kB titled 'File not found figshare'"),
    ("h5-not-bdata", "what arrived is an HDF5 file"),
    ("zip-junk", "what arrived is not a zip archive (5.0 kB)"),
    ("pt-junk", "what arrived is not a PyTorch file (5.0 kB)"))])
def test_wrong_content_is_refetched_once_then_fails(server, monkeypatch, tmp_path, case, arrived):
    """Without a published checksum, a file that is not what it claims to be is deleted, fetched once
    more from the start, then a clear error (API and CLI); nothing is left in place or recorded."""
    name, served = _serve_wrong(server, monkeypatch, case)
    a, home = ARTEFACTS[name], tmp_path / "home"
    url = f"{server.url}/{a.file}"
    msgs = []
    with pytest.raises(DownloadError) as e:
        download([name], mirror=server.url, progress=False, log=msgs.append)
    msg = str(e.value)
    assert msg.startswith(f"{name}: {url}: {arrived}") and "on both tries; the copy was deleted" in msg, msg
    assert "try again later" in msg.lower() and "BRAINRECON_MIRROR" in msg and msg.endswith(a.page) and "\n" not in msg
    assert [r["range"] for r in server.requests] == [None, None]   # the second try from the start
    assert any(m.startswith(f"{name}: {arrived}") and "downloading again" in m for m in msgs)

    def left():
        return sorted(p.name for p in (home / a.folder).iterdir()) if (home / a.folder).exists() else []

    assert left() == [] and name not in dl.read_manifest(home)["artefacts"]
    result = runner.invoke(app, ["download", name], env={"BRAINRECON_MIRROR": server.url})
    assert result.exit_code == 2 and "Traceback" not in result.output and result.output.count("error:") == 1
    assert _flat(f"{url}: {arrived}") in _flat(result.output), result.output
    assert left() == [] and name not in dl.read_manifest(home)["artefacts"]


def test_valid_bdata_without_checksum_is_accepted_and_recorded(server, tmp_path):
    a = ARTEFACTS[_PERCEPTION]
    data = _small_bdata(server.root / a.file).read_bytes()
    [path] = download([_PERCEPTION], mirror=server.url, progress=False)
    assert path.read_bytes() == data and len(server.requests) == 1
    rec = dl.read_manifest(tmp_path / "home")["artefacts"][_PERCEPTION]
    assert rec["sha256"] == hashlib.sha256(data).hexdigest() and rec["files"] == {a.relpath: len(data)}


def test_recorded_or_found_file_with_wrong_content_is_not_kept(server, monkeypatch, tmp_path):
    """A page recorded as the file (by an earlier version) is fetched again; a file found in place
    is adopted only if its content passes too."""
    a, home = ARTEFACTS[_PERCEPTION], tmp_path / "home"
    (home / "fmri").mkdir(parents=True)
    (home / a.relpath).write_bytes(_HTML)
    dl._record(home, {"name": a.name, "url": "x", "file": a.relpath, "size": len(_HTML),
                      "sha256": hashlib.sha256(_HTML).hexdigest(), "md5": "", "files": {a.relpath: len(_HTML)}})
    assert not dl.is_complete(a, home)
    data = _small_bdata(server.root / a.file).read_bytes()
    download([_PERCEPTION], mirror=server.url, progress=False)
    assert (home / a.relpath).read_bytes() == data and len(server.requests) == 1 and dl.is_complete(a, home)
    page = replace(a, md5=hashlib.md5(_HTML).hexdigest())   # even with a matching checksum
    (home / a.relpath).write_bytes(_HTML)
    assert dl._adopt(page, home, dl._quiet) is None


# ----------------------------------------------------------------------------------- archives

def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_unpack_zip_layouts_and_safety(tmp_path):
    expect = ("a.pt", "act_range/3x/relu7.txt")
    for i, top in enumerate(("pack/", "")):   # with and without a top folder
        z = _zip(tmp_path / f"pack{i}.zip", {f"{top}a.pt": b"A", f"{top}act_range/3x/relu7.txt": b"1 2"})
        files = unpack_zip(z, tmp_path / f"out{i}", expect)
        assert files == {"a.pt": 1, "act_range/3x/relu7.txt": 3}
        assert (tmp_path / f"out{i}" / "a.pt").read_bytes() == b"A"
    with pytest.raises(DownloadError, match=r"lacks act_range/3x/relu7.txt \(it holds a.pt\)"):
        unpack_zip(_zip(tmp_path / "short.zip", {"pack/a.pt": b"A"}), tmp_path / "short", expect)
    # an expected file with alternative names (a|b): the generator's bounds under their older name
    gen_expect = ARTEFACTS["generator-relu7"].expect
    older = _zip(tmp_path / "older.zip", {"g/generator_relu7.pt": b"G", "g/act_range/3x/fc7.txt": b"1"})
    assert "act_range/3x/fc7.txt" in unpack_zip(older, tmp_path / "older", gen_expect)
    with pytest.raises(DownloadError, match=r"lacks act_range/3x/relu7.txt or act_range/3x/fc7.txt"):
        unpack_zip(_zip(tmp_path / "short.zip", {"g/generator_relu7.pt": b"G"}), tmp_path / "short", gen_expect)
    # an archive of stimulus images must hold as many as were shown
    letters = _image_zip(tmp_path / "letters.zip", "LetterImage", LETTER_NAMES, ".tif")
    assert len(unpack_zip(letters, tmp_path / "letters", min_images=10)) == 10
    few = _image_zip(tmp_path / "few.zip", "LetterImage", LETTER_NAMES[:7], ".tif")
    with pytest.raises(DownloadError, match=r"few.zip: the archive holds 7 image files, expected at least 10 "
                                            r"\(it holds letter_black_img011_A.tif, .*please report it"):
        unpack_zip(few, tmp_path / "few", min_images=10)
    assert not (tmp_path / "few").exists()
    for evil in ("../evil.txt", "/abs/evil.txt", "pack/../../evil.txt"):
        with pytest.raises(DownloadError, match="refusing to unpack"):
            unpack_zip(_zip(tmp_path / "evil.zip", {"pack/a.pt": b"A", evil: b"x"}), tmp_path / "evil" / "out")
        assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "evil").exists()


def test_archive_download_unpacks_and_damaged_zip_is_refetched(server, monkeypatch, tmp_path):
    z = _zip(server.root / "pack.zip", {"pack/a.pt": b"A" * 1000, "pack/b.txt": b"B"})
    _register(monkeypatch, name="test/pack", file="pack.zip", folder="models", unpack=True, expect=("a.pt", "b.txt"))
    good = z.read_bytes()
    server.modes["pack.zip"] = ["corrupt"]   # no checksum known: the zip itself is found damaged
    msgs = []
    paths = download(["test/pack"], mirror=server.url, progress=False, log=msgs.append)
    home = tmp_path / "home"
    assert paths == [home / "models/pack/a.pt", home / "models/pack/b.txt"] and paths[1].read_bytes() == b"B"
    assert not (home / "models/pack.zip").exists() and any("damaged archive" in m for m in msgs)
    rec = json.loads((home / "manifest.json").read_text())["artefacts"]["test/pack"]
    assert rec["sha256"] == hashlib.sha256(good).hexdigest() and rec["size"] == len(good)
    assert rec["files"] == {"models/pack/a.pt": 1000, "models/pack/b.txt": 1}
    n = len(server.requests)
    assert runner.invoke(app, ["download", "test/pack"], env={"BRAINRECON_MIRROR": server.url}).exit_code == 0
    assert len(server.requests) == n
    listing = runner.invoke(app, ["download", "--list"]).output
    assert re.search(r"test/pack .*\[downloaded\]", listing) and "paper-subject1" in listing


# ----------------------------------------------------------------------------------- hints

def test_missing_artefact_hint(tmp_path):
    home = tmp_path / "home"
    h = missing_artefact_hint([home / "fmri/sub-01_perceptionNaturalImageTraining_original_VC.h5",
                               home / "models/VGG_ILSVRC_19_layers/VGG_ILSVRC_19_layers.pt",
                               home / "models/VGG_ILSVRC_19_layers/ilsvrc_2012_mean.npy"])
    assert h == "brainrecon download fmri/sub-01/perception-natural-training vgg19-caffe"
    h = missing_artefact_hint([tmp_path / "data/models/bvlc_reference_caffenet_generator_ILSVRC2012_Training/"
                               "generator_relu7.pt"])
    assert h == f"brainrecon download generator-relu7 --dest {tmp_path / 'data'}"
    h = missing_artefact_hint(["/elsewhere/sub-02_ImageNetTest_fmriprep_volume_native.h5"])
    assert h.startswith("brainrecon download fmri/sub-02/fmriprep-test (it saves") and str(home) in h
    assert missing_artefact_hint([tmp_path / "nope.h5"]) is None


def test_run_without_the_data_names_the_download_commands(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    monkeypatch.delenv("BRAINRECON_HOME")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    result = runner.invoke(app, ["run", str(EXAMPLES / "dir-subject1-vgg19.yaml")])
    assert result.exit_code == 2, result.output
    text = _flat(result.output)
    command = ("brainrecon download fmri/sub-01/perception-natural-training fmri/sub-01/perception-natural-test "
               "vgg19-caffe")
    for needle in (command, "sub-01_perceptionNaturalImageTraining_original_VC.h5", "VGG_ILSVRC_19_layers.pt",
                   "forms.gle", "n01518878_5958.JPEG"):
        assert _flat(needle) in text, result.output
    assert "Traceback" not in result.output
    # a path that no download provides, and a config-relative network path
    cfg = tmp_path / "study.yaml"
    cfg.write_text("train: nope.h5\ntest: {x: nope.h5}\nimages: .\nout: out\n"
                   "network: vgg19-caffe:data/models/VGG_ILSVRC_19_layers/VGG_ILSVRC_19_layers.pt\n")
    result = runner.invoke(app, ["run", str(cfg)])
    text = _flat(result.output)
    assert result.exit_code == 2 and "nosuchfile" in text and _flat(str(tmp_path / "nope.h5")) in text
    assert _flat(f"brainrecon download vgg19-caffe --dest {tmp_path / 'data'}") in text, result.output


def test_run_generator_example_without_the_data(monkeypatch, tmp_path):
    from brainrecon import cli
    if "generator" not in cli._run_keys():
        pytest.skip("brainrecon run does not take `generator:` yet")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    monkeypatch.delenv("BRAINRECON_HOME")
    result = runner.invoke(app, ["run", str(EXAMPLES / "dir-subject1-vgg19-generator.yaml")])
    text = _flat(result.output)
    assert result.exit_code == 2 and "generator-relu7" in text and "vgg19-caffe" in text, result.output


FOUR = EXAMPLES / "dir-subject1-vgg19-four-experiments.yaml"
_NEW_FIELDS = ("labels", "exclude_labels")   # PipelineConfig fields the four-experiment example needs


def _numbered(src: Path, dst: Path) -> dict[str, int]:
    """A copy of a simulated BData file labelled by number, as the lab's shape and letter files:
    ``stimulus_name`` with a vmap becomes ``stimulus_id`` without one; returns {name: number}."""
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        names = {f"vmap/stimulus_name/{k}": float(k) for k in f["vmap/stimulus_name"]}
        ids = {f[k][()].decode(): int(v) for k, v in names.items()}
        keys = [k.decode() for k in f["metadata/key"][()]]
        keys[keys.index("stimulus_name")] = "stimulus_id"
        f["metadata/key"][...] = np.array([k.encode() for k in keys], dtype=object)
        del f["vmap/stimulus_name"]
    return ids


def _shipped_imagery_map() -> dict[int, str]:
    """The imagery label map shipped with the package (number -> image stem)."""
    import brainrecon
    found = sorted(Path(brainrecon.__file__).parent.rglob("*imagery*.tsv"))
    assert found, "no imagery label map (*imagery*.tsv) ships with the package"
    rows = [line.split("\t") for line in found[0].read_text().splitlines() if line.strip() and not line.startswith("#")]
    num = 0 if rows[0][0].strip().isdigit() else 1
    return {int(r[num]): r[1 - num].strip() for r in rows}


def _vgg19_state() -> dict:
    """A random VGG19 in torchvision's key layout (what the lab's converted Caffe weights use)."""
    from brainrecon.nets.vgg import VGGEncoder
    torch.manual_seed(0)
    net = VGGEncoder("vgg19", classifier=True, ceil_mode=False)
    state = {f"features.{i}.{p}": getattr(conv, p) * (0.5 if p == "weight" else 1)
             for i, conv in zip(_VGG_FEATURES, net.convs) for p in ("weight", "bias")}
    state.update({f"classifier.{j}.{p}": getattr(fc, p) for j, fc in zip((0, 3, 6), net.fcs) for p in ("weight", "bias")})
    return state


def test_four_experiment_example_config(request, monkeypatch, tmp_path):
    """The example of subject 1's four experiments names only files of `brainrecon download paper-subject1`
    in the download layout, maps the numbered files with the downloaded stimulus lists and the shipped
    imagery map; once `run` takes label maps, it runs to the end on fixture files in that layout."""
    import yaml

    from brainrecon import cli
    raw = yaml.safe_load(FOUR.read_text())
    assert set(raw["test"]) == {"natural", "shapes", "letters", "imagery"}
    assert set(raw) - set(_NEW_FIELDS) <= set(cli._run_keys())
    home = "~/.cache/brainrecon/"
    provided = {rel: a.name for a in expand(["paper-subject1"]) for rel in a.provides() + [a.relpath]}
    spec = raw["network"].partition(":")[2]
    files = [raw["train"], *raw["test"].values(), spec, *(v for v in raw["labels"].values() if "/" in v)]
    assert all(f.startswith(home) for f in files), files
    named = {provided.get(f[len(home):]) for f in files}
    assert None not in named, [f for f in files if f[len(home):] not in provided]
    assert {"fmri/sub-01/perception-shapes", "fmri/sub-01/perception-letters", "fmri/sub-01/imagery",
            "stimuli/shapes-list", "stimuli/letters-list", "vgg19-caffe"} <= named
    assert raw["labels"] == {"shapes": home + ARTEFACTS["stimuli/shapes-list"].relpath,
                             "letters": home + ARTEFACTS["stimuli/letters-list"].relpath, "imagery": "dir-imagery"}
    assert raw["images"] == home + "images"   # the shape and letter archives unpack below it
    for key in ("shapes", "letters"):
        assert ARTEFACTS[f"stimuli/{key}-images"].unpack_dir.startswith("images/")
    assert isinstance(raw["exclude_labels"], list) and raw["exclude_labels"] and \
        all(isinstance(x, str) for x in raw["exclude_labels"])
    # everything else is a valid config today
    today = tmp_path / "today.yaml"
    today.write_text(yaml.safe_dump({k: v for k, v in raw.items() if k not in _NEW_FIELDS}))
    assert cli._read_config(today)["test"].keys() == raw["test"].keys()

    from brainrecon.pipeline import PipelineConfig
    if not set(_NEW_FIELDS) <= set(PipelineConfig.model_fields):
        pytest.skip("brainrecon run does not take labels / exclude_labels yet")
    imagery_map = _shipped_imagery_map()
    assert sorted(imagery_map) == list(range(1, 27))
    assert set(raw["exclude_labels"]) == {imagery_map[16]}   # the fixation label of the shipped map
    # without the data: the download command that provides it
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    monkeypatch.delenv("BRAINRECON_HOME")
    result = runner.invoke(app, ["run", str(FOUR)])
    assert result.exit_code == 2 and "fmri/sub-01/imagery" in _flat(result.output), result.output

    # fixture files where the downloads would be: the simulated subject, the numbered files as the lab's
    subject, _ = request.getfixturevalue("small_subject")
    data = tmp_path / "user" / ".cache" / "brainrecon"
    (data / "fmri").mkdir(parents=True)
    (data / "stimuli").mkdir()
    shutil.copytree(subject / "images", data / "images")
    shutil.copy(subject / "train.h5", data / "fmri" / "sub-01_perceptionNaturalImageTraining_original_VC.h5")
    shutil.copy(subject / "test_natural.h5", data / "fmri" / "sub-01_perceptionNaturalImageTest_original_VC.h5")
    for key, stem, part in (("shapes", "ArtificialImage", "perceptionArtificialImage"),
                            ("letters", "LetterImage", "perceptionLetterImage")):
        ids = _numbered(subject / f"test_{key}.h5", data / "fmri" / f"sub-01_{part}_original_VC.h5")
        _stimulus_list(data / "stimuli" / f"stimulus_{stem}.tsv", list(ids), list(ids.values()))
    # imagery: 26 numbered conditions, two trials each (shape responses stand in), fixation included
    img = data / "fmri" / "sub-01_imagery_original_VC.h5"
    _numbered(subject / "test_shapes.h5", img)
    with h5py.File(img, "r+") as f:
        keys = [k.decode() for k in f["metadata/key"][()]]
        col = int(np.flatnonzero(f["metadata/value"][keys.index("stimulus_id")] == 1)[0])
        rows = f["dataset"][:52]
        rows[:, col] = np.tile(np.arange(1, 27), 2)
        del f["dataset"]
        f["dataset"] = rows
    from PIL import Image
    some = sorted((subject / "images").glob("*.png"))
    for i, stem in imagery_map.items():
        if i != 16 and not list((data / "images").rglob(f"{stem}.*")):
            (data / "images" / "imagery").mkdir(exist_ok=True)
            Image.open(some[i % len(some)]).save(data / "images" / "imagery" / f"{stem}.png")
    models = data / "models" / "VGG_ILSVRC_19_layers"
    models.mkdir(parents=True)
    torch.save(_vgg19_state(), models / "VGG_ILSVRC_19_layers.pt")
    out = tmp_path / "four"
    result = runner.invoke(app, ["run", str(FOUR), "--out", str(out), "--image-size", "32", "--iterations", "2",
                                 "--no-true-features", "--layers", "conv1_1,conv3_1,fc7", "--alpha-cv", "single"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert {k: metrics[k]["n_images"] for k in ("natural", "shapes", "letters", "imagery")} == {
        "natural": 6, "shapes": 40, "letters": 10, "imagery": 25}


# ----------------------------------------------------------------------------------- feature SD

def test_feature_sd_loader(tmp_path):
    rng = np.random.default_rng(0)
    # the lab's layout: one variable per layer, a row vector of channel SDs (savemat of 1-D arrays)
    sds = {k: rng.random(n).astype(np.float32) + 0.1 for k, n in VGG19_CHANNELS.items()}
    path = tmp_path / FEATURE_SD_FILE
    scipy.io.savemat(path, {**sds, "relu6": sds["fc6"]})
    assert scipy.io.loadmat(path)["conv2_1"].shape == (1, 128)
    out = load_feature_sd(path)
    assert list(out) == list(VGG19_CHANNELS) and out["fc8"].shape == (1000,) and out["conv5_4"].dtype == np.float32
    assert np.array_equal(out["conv3_2"], sds["conv3_2"])
    assert list(load_feature_sd(path, layers=["conv1_1", "fc7"])) == ["conv1_1", "fc7"]
    one = tmp_path / "scalar.mat"
    scipy.io.savemat(one, {"conv1_1": 2.5})
    assert np.all(load_feature_sd(one, layers=["conv1_1"])["conv1_1"] == 2.5)
    with pytest.raises(ValueError, match="no variable for layer.*conv1_2"):
        load_feature_sd(one, layers=["conv1_1", "conv1_2"])
    scipy.io.savemat(one, {"conv1_1": np.ones(10)})
    with pytest.raises(ValueError, match="conv1_1 holds 10 values .* expected one per channel \\(64\\)"):
        load_feature_sd(one, layers=["conv1_1"])
    (tmp_path / "bad.mat").write_bytes(b"x" * 200)
    with pytest.raises(ValueError, match="bad.mat is not a readable"):
        load_feature_sd(tmp_path / "bad.mat")
    with pytest.raises(FileNotFoundError, match="brainrecon download vgg19-caffe"):
        load_feature_sd(tmp_path / "none.mat")


# ----------------------------------------------------------------------------------- every entry

def _fmri_fixture(path: Path, fmriprep: bool, train: bool, seed: int) -> list[str]:
    """A small BData file in the layout of the published files; returns its labels."""
    rng = np.random.default_rng(seed)
    n_img, reps, n_vox = (6, 2, 30) if train else (2, 3, 30)
    labels = [f"n0{1440764 + seed * 10 + i}_{100 + i}" for i in range(n_img)] * reps
    b = BData()
    b.add(rng.standard_normal((len(labels), n_vox)), "VoxelData")
    for k, sel in (("ROI_V1", slice(0, 10)), ("ROI_V2", slice(10, 20)), ("ROI_VC", slice(0, 30))):
        flags = np.full(n_vox, np.nan)
        flags[sel] = 1
        b.add_metadata(k, flags, f"1 = {k}", where="VoxelData")
    for k in ("voxel_x", "voxel_y", "voxel_z"):
        b.add_metadata(k, rng.integers(-60, 60, n_vox).astype(float), f"voxel {k[-1]}", where="VoxelData")
    b.add(np.repeat(np.arange(1, reps + 1), n_img), "Run")
    b.add(np.arange(len(labels)), "Block")
    if fmriprep:   # newer files: stimulus_name with a vmap
        ids = {lab: i + 1.0 for i, lab in enumerate(dict.fromkeys(labels))}
        b.add(np.array([ids[lab] for lab in labels]), "stimulus_name")
        b.add_vmap("stimulus_name", {v: k for k, v in ids.items()})
    else:          # older files: float stimulus id in column 1 of the Label block
        b.add(np.stack([np.ones(len(labels)), [name_to_stimulus_id(lab) for lab in labels]], 1), "Label")
    write_bdata(path, b)
    return labels


_VGG_FEATURES = (0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34)


@pytest.fixture(scope="session")
def vgg19_zip(tmp_path_factory) -> Path:
    """The lab's VGG zip: a full-size VGG19 state dict in torchvision's key layout (zeros, with marked
    biases), the mean image and the feature-SD file. Made once per session (548 MB of tensors)."""
    state, c_in = {}, 3
    channels = [c for c, n in ((64, 2), (128, 2), (256, 4), (512, 4), (512, 4)) for _ in range(n)]
    for i, c in zip(_VGG_FEATURES, channels):
        state[f"features.{i}.weight"] = torch.zeros(c, c_in, 3, 3)
        state[f"features.{i}.bias"] = torch.arange(c, dtype=torch.float32) + i
        c_in = c
    for j, (n_in, n_out) in zip((0, 3, 6), ((25088, 4096), (4096, 4096), (4096, 1000))):
        state[f"classifier.{j}.weight"] = torch.zeros(n_out, n_in)
        state[f"classifier.{j}.bias"] = torch.arange(n_out, dtype=torch.float32) * 0.5 + j
    path = tmp_path_factory.mktemp("vgg") / "VGG_ILSVRC_19_layers.zip"
    sd = tmp_path_factory.mktemp("sd") / FEATURE_SD_FILE
    scipy.io.savemat(sd, {k: np.full(n, 0.5 + i, np.float32) for i, (k, n) in enumerate(VGG19_CHANNELS.items())})
    mean = np.stack([np.full((256, 256), v) for v in (103.939, 116.779, 123.68)])   # BGR, as the lab's file
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        with zf.open("VGG_ILSVRC_19_layers/VGG_ILSVRC_19_layers.pt", "w") as f:
            torch.save(state, f)
        with zf.open("VGG_ILSVRC_19_layers/ilsvrc_2012_mean.npy", "w") as f:
            np.save(f, mean)
        zf.write(sd, f"VGG_ILSVRC_19_layers/{FEATURE_SD_FILE}")
    return path


def _generator_zip(path: Path) -> np.ndarray:
    """The lab's generator zip: a relu7 generator state dict in the lab's key layout (the AlexNet
    generator of Dosovitskiy & Brox: defc7/6/5, deconv5 ... deconv0) and its latent bounds."""
    state = {}
    for k in ("defc7", "defc6", "defc5"):
        state[f"{k}.weight"], state[f"{k}.bias"] = torch.zeros(4096, 4096), torch.zeros(4096)
    for k, c_in, c_out, ks in (("deconv5", 256, 256, 4), ("conv5_1", 256, 512, 3), ("deconv4", 512, 256, 4),
                               ("conv4_1", 256, 256, 3), ("deconv3", 256, 128, 4), ("conv3_1", 128, 128, 3),
                               ("deconv2", 128, 64, 4), ("deconv1", 64, 32, 4), ("deconv0", 32, 3, 4)):
        state[f"{k}.weight"] = torch.zeros(c_in, c_out, ks, ks)   # ConvTranspose2d: (in, out, k, k)
        state[f"{k}.bias"] = torch.zeros(c_out)
    state["deconv0.bias"] = torch.tensor([0.1, 0.2, 0.3])
    # the lab's file names every layer twice: by name and by position in its defc / deconv sequences
    for seq, names in (("defc", ("defc7", "defc6", "defc5")),
                       ("deconv", ("deconv5", "conv5_1", "deconv4", "conv4_1", "deconv3", "conv3_1", "deconv2",
                                   "deconv1", "deconv0"))):
        for i, k in enumerate(names):
            for p in ("weight", "bias"):
                state[f"{seq}.{2 * i}.{p}"] = state[f"{k}.{p}"]
    assert len(state) == 48
    bounds = np.linspace(0.5, 30.0, 4096)
    top = "bvlc_reference_caffenet_generator_ILSVRC2012_Training"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        with zf.open(f"{top}/generator_relu7.pt", "w") as f:
            torch.save(state, f)
        zf.writestr(f"{top}/act_range/3x/relu7.txt", " ".join(f"{v:.6f}" for v in bounds) + "\n")
    return bounds


_COLOURS = ("red", "green", "blue", "yellow", "magenta", "cyan", "white", "black")
_FORMS = ("square", "smallring", "largering", "plus", "cross")
SHAPE_NAMES = [f"colorExpStim{i + 1:02d}_{c}_{f}" for i, (c, f) in enumerate((c, f) for c in _COLOURS for f in _FORMS)]
LETTER_NAMES = [f"letter_black_img{11 + i:03d}_{x}" for i, x in enumerate("ACEINORSTU")]


def _stimulus_list(path: Path, names, ids=None) -> Path:
    """A stimulus list as published: no header, stimulus name <TAB> stimulus_id."""
    ids = ids if ids is not None else range(1, len(names) + 1)
    path.write_text("".join(f"{n}\t{i}\n" for n, i in zip(names, ids)))
    return path


def _image_zip(path: Path, top: str, names, ext: str) -> Path:
    """An archive of small stimulus images under a top folder, as the published ones."""
    from PIL import Image
    with zipfile.ZipFile(path, "w") as zf:
        for i, n in enumerate(names):
            buf = io.BytesIO()
            Image.new("RGB", (8, 8), (i * 6 % 256, 255 - i * 6 % 256, 0)).save(buf, format="TIFF")
            zf.writestr(f"{top}/{n}{ext}", buf.getvalue())
    return path


def _stimulus_fixtures(root: Path) -> None:
    natural = [f"n0{1440764 + i}_{100 + i}" for i in range(6)]
    _stimulus_list(root / "stimulus_NaturalImageTraining.tsv", natural, [name_to_stimulus_id(n) for n in natural])
    _stimulus_list(root / "stimulus_NaturalImageTest.tsv", natural[:2], [name_to_stimulus_id(n) for n in natural[:2]])
    _stimulus_list(root / "stimulus_ArtificialImage.tsv", SHAPE_NAMES)
    _stimulus_list(root / "stimulus_LetterImage.tsv", LETTER_NAMES)
    _image_zip(root / "ArtificialImage.zip", "ArtificialImage", SHAPE_NAMES, ".tiff")
    _image_zip(root / "LetterImage.zip", "LetterImage", LETTER_NAMES, ".tif")


def test_every_registry_entry_downloads_and_loads(server, vgg19_zip, tmp_path):
    labels = {}
    for i, a in enumerate(ARTEFACTS.values()):
        if a.name.startswith("fmri/"):
            labels[a.name] = _fmri_fixture(server.root / a.file, "fmriprep" in a.name, a.name.endswith("training"), i)
    shutil.copy(vgg19_zip, server.root / ARTEFACTS["vgg19-caffe"].file)
    bounds = _generator_zip(server.root / ARTEFACTS["generator-relu7"].file)
    _stimulus_fixtures(server.root)
    assert {p.name for p in server.root.iterdir()} == {a.file for a in ARTEFACTS.values()}
    # the ids not known in advance come from the two articles' file lists (served here)
    ids = {}
    for article in (7033577, 21564384):
        ids.update(_publish(server, article, [a.file for a in ARTEFACTS.values()
                                              if a.resolved_at_download and a.article == article],
                            filler=3, first_id=article * 10))

    dest = tmp_path / "data"
    # the published md5 sums cannot match the fixtures: check them in a separate, explicit step
    with pytest.MonkeyPatch.context() as mp:
        for a in ARTEFACTS.values():
            mp.setitem(ARTEFACTS, a.name, replace(a, md5=None))
        result = runner.invoke(app, ["download", "all", "--dest", str(dest)],
                               env={"BRAINRECON_MIRROR": server.url, "BRAINRECON_FIGSHARE_API": server.url})
    assert result.exit_code == 0, result.output
    printed = [Path(line) for line in result.stdout.splitlines()]
    assert printed == [p for a in ARTEFACTS.values() for p in a.paths(dest)] and all(p.exists() for p in printed)
    manifest = json.loads((dest / "manifest.json").read_text())["artefacts"]
    assert set(manifest) == set(ARTEFACTS)
    assert len(_list_pages(server)) == 2   # each article's list read once, one page each
    for a in ARTEFACTS.values():   # looked-up ids recorded, files checked against the listed md5
        rec = manifest[a.name]
        if a.resolved_at_download:
            assert rec["file_id"] == ids[a.file] and rec["listed"]["md5"] == rec["md5"], a.name
        else:
            assert rec["file_id"] == a.file_id and "listed" not in rec, a.name

    for name, labs in labels.items():
        fmri = read_fmri(dest / ARTEFACTS[name].relpath, "ROI_VC")
        assert fmri.labels == labs and fmri.X.shape == (len(labs), 30)
    # the stimulus lists and images: every shape and letter listed has its image under images/
    from brainrecon.data.stimuli import find_images
    for key, names in (("shapes", SHAPE_NAMES), ("letters", LETTER_NAMES)):
        rows = [line.split("\t") for line in (dest / ARTEFACTS[f"stimuli/{key}-list"].relpath).read_text().splitlines()]
        assert [r[0] for r in rows] == names and [int(r[1]) for r in rows] == list(range(1, len(names) + 1))
        found = find_images(dest / "images", names)
        assert sorted(found) == sorted(names) and all(p.parent.parent == dest / "images" for p in found.values())
    models = dest / "models"
    net = load_network(f"vgg19-caffe:{models / 'VGG_ILSVRC_19_layers/VGG_ILSVRC_19_layers.pt'}")
    assert len(net.layer_names) == 19 and torch.equal(net.convs[15].bias, torch.arange(512.) + 34)
    assert torch.equal(net.fcs[2].bias, torch.arange(1000.) * 0.5 + 6)
    sd = load_feature_sd(models / "VGG_ILSVRC_19_layers" / FEATURE_SD_FILE)
    assert len(sd) == 19 and np.all(sd["fc8"] == 0.5 + 18)
    mean = np.load(models / "VGG_ILSVRC_19_layers/ilsvrc_2012_mean.npy")
    assert mean.shape == (3, 256, 256) and np.allclose(mean.mean(axis=(1, 2)), [103.939, 116.779, 123.68])

    generator = pytest.importorskip("brainrecon.nets.generator")
    if not hasattr(generator, "load_relu7_generator"):
        pytest.skip("brainrecon.nets.generator.load_relu7_generator is not there yet")
    gdir = models / "bvlc_reference_caffenet_generator_ILSVRC2012_Training"
    gen = generator.load_relu7_generator(gdir / "generator_relu7.pt")
    assert torch.allclose(gen.deconv0.bias, torch.tensor([0.1, 0.2, 0.3]))
    assert np.allclose(np.asarray(generator.load_latent_bounds(gdir / "act_range/3x/relu7.txt")).ravel(), bounds,
                       atol=1e-5)
    if hasattr(generator, "load_generator"):   # the spec `brainrecon run` takes
        gen = generator.load_generator(f"relu7:{gdir / 'generator_relu7.pt'}")
        assert np.allclose(gen.latent_upper.numpy(), bounds, atol=1e-5)


def test_published_checksums_are_checked(server, monkeypatch, tmp_path):
    """With the real md5 sums a fixture is rejected, refetched once, then a clear error."""
    _fmri_fixture(server.root / ARTEFACTS["fmri/sub-01/fmriprep-test"].file, True, False, 0)
    with pytest.raises(DownloadError, match="fmri/sub-01/fmriprep-test: .*damaged again \\(md5 .* expected "
                                            "7ab3fd8900a766a79e3f266ff223302a"):
        download(["fmri/sub-01/fmriprep-test"], mirror=server.url, progress=False)
    assert len(server.requests) == 2
