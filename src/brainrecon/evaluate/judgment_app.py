"""A browser app for human judgment (:mod:`~brainrecon.evaluate.judgment`).

Two ways to collect judgments, with the same page and the same answers format:

- :func:`make_server`: a small web server (Python's standard library) for raters on this machine or
  the local network. Each rater gets the run's trials in an order of their own; every answer is
  appended to the answers file at once, and a rater who comes back resumes where they stopped. The
  page never learns which candidate is the stimulus (images have opaque addresses).
- :func:`export_page`: one self-contained HTML file per rater, with the images embedded, to send to
  raters elsewhere. Answers stay in the rater's browser until they download them (JSON lines) and
  send the file back. The page holds the answer key in its source.
"""
from __future__ import annotations

import base64
import json
import threading
import zlib
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np

from ..data.stimuli import load_image, png_bytes
from .judgment import JudgmentError, RunImages, Trial, answer_record, read_answers, rater_order

STIMULUS_DISPLAY_SIZE = 224   # stimuli are shown centre-cropped to a square, as presented, at this size


def page_html(config: dict | None = None) -> str:
    """The rater's page; ``config`` embeds trials and images for a static page (None: talk to the server)."""
    text = resources.files(__package__).joinpath("judgment_page.html").read_text()
    blob = json.dumps(config).replace("</", "<\\/") if config is not None else "null"
    return text.replace("/*CONFIG*/null", blob)


class ImageBank:
    """PNG bytes of every reconstruction and stimulus under an opaque number (shuffled, seeded)."""

    def __init__(self, images: RunImages, seed: int = 0):
        sources = [("recon", s, lab, p) for s, v in images.recon.items() for lab, p in v.items()]
        sources += [("stimulus", s, lab, p) for s, v in images.stimuli.items() for lab, p in v.items()]
        order = np.random.default_rng(seed).permutation(len(sources))
        self.number = {src[:3]: int(i) for src, i in zip(sources, order)}
        self.by_number = {int(i): src for src, i in zip(sources, order)}
        self._cache: dict[int, bytes] = {}

    def png(self, number: int) -> bytes:
        if number not in self._cache:
            kind, _, _, path = self.by_number[number]
            self._cache[number] = (Path(path).read_bytes() if kind == "recon"
                                   else png_bytes(load_image(path, STIMULUS_DISPLAY_SIZE)))
        return self._cache[number]

    def trial_images(self, trial: Trial, stimulus_left: bool) -> tuple[int, int, int]:
        """(reconstruction, left candidate, right candidate) numbers."""
        stim = self.number[("stimulus", trial.test_set, trial.label)]
        other = self.number[("stimulus", trial.test_set, trial.distractor)]
        return (self.number[("recon", trial.test_set, trial.label)],
                *((stim, other) if stimulus_left else (other, stim)))


class JudgmentSession:
    """Trials, per-rater progress and the answers file of a server; safe to call from several threads."""

    def __init__(self, images: RunImages, trials: list[Trial], answers: Path, seed: int = 0):
        self.images, self.trials, self.answers, self.seed = images, trials, Path(answers), seed
        self.bank = ImageBank(images, seed)
        self.lock = threading.Lock()
        self.orders: dict[str, list[tuple[Trial, bool]]] = {}
        self.done: dict[str, set[str]] = {}
        ids = {t.id for t in trials}
        if self.answers.exists():
            for rec in read_answers(self.answers):
                if rec["trial"] not in ids:
                    raise JudgmentError(f"{self.answers} holds judgments of trials this run does not have "
                                        f"({rec['trial']!r}): use another --answers file, or the "
                                        "--pairs-per-image and --seed it was made with")
                self.done.setdefault(rec["rater"], set()).add(rec["trial"])
        self.answers.parent.mkdir(parents=True, exist_ok=True)

    def _order(self, rater: str) -> list[tuple[Trial, bool]]:
        if rater not in self.orders:
            self.orders[rater] = rater_order(self.trials, rater, self.seed)
        return self.orders[rater]

    def next(self, rater: str) -> dict:
        """The rater's progress and next trial: {done, total, position, recon, left, right} (addresses)."""
        if not rater:
            raise JudgmentError("enter a rater name")
        with self.lock:
            order, done = self._order(rater), self.done.get(rater, set())
            pos = next((i for i, (t, _) in enumerate(order) if t.id not in done), None)
            out = {"done": len(done), "total": len(order), "position": pos}
            if pos is not None:
                nums = self.bank.trial_images(*order[pos])
                out.update(zip(("recon", "left", "right"), (f"image/{n}.png" for n in nums)))
            return out

    def answer(self, rater: str, position: int, side: str, rt_ms: float | None = None) -> dict:
        """Record the rater's pick (``side``: left or right) for the trial at ``position``; the next trial."""
        if side not in ("left", "right"):
            raise JudgmentError(f"side must be left or right, not {side!r}")
        with self.lock:
            order = self._order(rater)
            if not isinstance(position, int) or not 0 <= position < len(order):
                raise JudgmentError(f"no trial at position {position!r}")
            trial, stimulus_left = order[position]
            if trial.id not in self.done.get(rater, set()):
                choice = trial.label if (side == "left") == stimulus_left else trial.distractor
                rec = answer_record(trial, rater, choice, stimulus_left, rt_ms)
                with self.answers.open("a") as f:       # appended at once: nothing is lost if the server stops
                    f.write(json.dumps(rec) + "\n")
                self.done.setdefault(rater, set()).add(trial.id)
        return self.next(rater)


def _handler(session: JudgmentSession):
    page = page_html().encode()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):       # quiet: the command prints its own progress
            pass

        def _send(self, status: int, body: bytes, kind: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, fn) -> None:
            try:
                self._send(HTTPStatus.OK, json.dumps(fn()).encode(), "application/json")
            except (JudgmentError, ValueError, KeyError, TypeError) as e:
                msg = str(e) if isinstance(e, JudgmentError) else f"bad request: {e}"
                self._send(HTTPStatus.BAD_REQUEST, json.dumps({"error": msg}).encode(), "application/json")

        def do_GET(self):
            url = urlparse(self.path)
            if url.path in ("/", "/index.html"):
                return self._send(HTTPStatus.OK, page, "text/html; charset=utf-8")
            if url.path == "/api/next":
                return self._json(lambda: session.next(parse_qs(url.query).get("rater", [""])[0].strip()))
            if url.path.startswith("/image/") and url.path.endswith(".png"):
                try:
                    return self._send(HTTPStatus.OK, session.bank.png(int(url.path[7:-4])), "image/png")
                except (ValueError, KeyError):
                    pass
            self._send(HTTPStatus.NOT_FOUND, b"not found", "text/plain")

        def do_POST(self):
            if urlparse(self.path).path != "/api/answer":
                return self._send(HTTPStatus.NOT_FOUND, b"not found", "text/plain")

            def record():
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                return session.answer(str(body["rater"]).strip(), body["position"], body["side"], body.get("rt_ms"))
            self._json(record)

    return Handler


def make_server(session: JudgmentSession, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """A server for ``session`` (not started: call ``serve_forever``); port 0 picks a free one."""
    return ThreadingHTTPServer((host, port), _handler(session))


def export_page(images: RunImages, trials: list[Trial], rater: str, path: Path, seed: int = 0) -> Path:
    """A self-contained page of all ``trials`` for one rater, in that rater's order (as the server's)."""
    if not rater:
        raise JudgmentError("a static page is made for one rater: give their name")
    bank = ImageBank(images, seed)
    used: dict[int, int] = {}
    rows = []
    for trial, left in rater_order(trials, rater, seed):
        nums = [used.setdefault(n, len(used)) for n in bank.trial_images(trial, left)]
        rows.append({"id": trial.id, "test_set": trial.test_set, "label": trial.label,
                     "distractor": trial.distractor, "stimulus_left": left,
                     "recon": nums[0], "left": nums[1], "right": nums[2]})
    uris = [""] * len(used)
    for n, i in used.items():
        uris[i] = "data:image/png;base64," + base64.b64encode(bank.png(n)).decode()
    key = f"{rater}-{seed}-{zlib.crc32('|'.join(t.id for t in trials).encode()):08x}"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page_html({"key": key, "rater": rater, "trials": rows, "images": uris}))
    return path
