"""A browser app for human judgment (:mod:`~brainrecon.evaluate.judgment`).

Two ways to collect judgments, with the same page and the same answers format:

- :func:`make_server`: a small web server (Python's standard library) for raters on this machine or
  the local network. Each rater gets the run's trials in an order of their own; every answer is
  appended to the answers file at once, and a rater who comes back resumes where they stopped. The
  page never learns which candidate is the stimulus (images have opaque addresses).
- :func:`export_page`: one self-contained HTML file per rater, with the images embedded, to send to
  raters elsewhere. Answers stay in the rater's browser until they download them (JSON lines) and
  send the file back. The page holds the answer key in its source.

The server has no accounts: whoever can reach it can judge under any name. It listens on this
machine only (127.0.0.1) unless told otherwise; bound to 0.0.0.0 it trusts the local network. Against
web pages open in a rater's browser, it answers only requests that name it in their ``Host`` header
(with its port): its bound address, ``localhost``, ``127.0.0.1`` or ``[::1]``; bound to 0.0.0.0 also
any IP address and this machine's host name (``socket.gethostname()``, its first label, and that
label + ``.local``). Any other name is refused (403), since a page that rebinds its own DNS name
(DNS rebinding) to this machine reaches the server under its own name; a page reaching it under an IP
address or this machine's name is another origin and cannot read the answers. Answers must be posted
as ``application/json`` (which a page cannot send to another origin without the server's consent,
which it never gives), and an ``Origin`` header, where there is one, must be this server's
(``http://`` + the Host header). The body of an answer is a JSON object of at most 16 KiB with exactly
the keys ``rater``, ``position``, ``side`` and (optional) ``rt_ms``: other keys are refused; every
field is checked before anything is written. Every refusal is a 4xx with a JSON body ``{"error":
message}``.
"""
from __future__ import annotations

import base64
import ipaddress
import json
import logging
import math
import re
import socket
import threading
import zlib
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np

from ..data.stimuli import load_image, png_bytes
from .judgment import (JudgmentError, RunImages, Trial, Warn, answer_record, append_answer, rater_order,
                       repair_answers, valid_rater)

STIMULUS_DISPLAY_SIZE = 224   # stimuli are shown centre-cropped to a square, as presented, at this size
MAX_BODY = 16 * 1024          # bytes of an answer's request body
MAX_DRAIN = 1024 * 1024       # bytes of a too long body read (and dropped) before refusing it
MAX_RT_MS = 3_600_000         # an hour
ANSWER_KEYS = ("rater", "position", "side", "rt_ms")
LOCAL_NAMES = {"localhost", "127.0.0.1", "[::1]"}
ANY_ADDRESS = {"", "0.0.0.0", "::"}
_SCRIPT_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
log = logging.getLogger(__name__)


def page_html(config: dict | None = None) -> str:
    """The rater's page; ``config`` embeds trials and images for a static page (None: talk to the server).

    The config's JSON is escaped for a ``<script>`` element: ``<``, ``>``, ``&``, U+2028 and U+2029
    as ``\\uXXXX`` (they only occur in JSON strings, where that escape means the same).
    """
    text = resources.files(__package__).joinpath("judgment_page.html").read_text(encoding="utf-8")
    blob = "null" if config is None else re.sub("[<>&\u2028\u2029]", lambda m: _SCRIPT_ESCAPES[m[0]],
                                                json.dumps(config))
    return text.replace("/*CONFIG*/null", blob)


def check_answer(rater: object, position: object, side: object, rt_ms: object = None
                 ) -> tuple[str, int, str, float | None]:
    """An answer's fields, checked: (rater name, position >= 0, "left" or "right", response time in ms
    or None); raises :class:`JudgmentError` naming the first bad one. Whether the position is a
    trial's is the session's to check."""
    rater = valid_rater(rater)
    if not isinstance(position, int) or isinstance(position, bool) or position < 0:
        raise JudgmentError(f"position must be a trial's number (an integer >= 0), not {position!r:.40}")
    if side not in ("left", "right"):
        raise JudgmentError(f"side must be left or right, not {side!r:.40}")
    if rt_ms is not None:
        if (not isinstance(rt_ms, (int, float)) or isinstance(rt_ms, bool) or not math.isfinite(rt_ms)
                or not 0 <= rt_ms <= MAX_RT_MS):
            raise JudgmentError(f"rt_ms must be a response time from 0 to {MAX_RT_MS} ms, or null; "
                                f"not {rt_ms!r:.40}")
        rt_ms = float(rt_ms)
    return rater, position, side, rt_ms


def parse_answer(body: bytes) -> tuple[str, int, str, float | None]:
    """The fields of an answer's request body (a JSON object with exactly ``ANSWER_KEYS``, rt_ms
    optional), checked as by :func:`check_answer`; raises :class:`JudgmentError`."""
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):       # not JSON, not UTF-8, nested too deep, an absurd number
        raise JudgmentError("the request body is not JSON") from None
    if not isinstance(obj, dict):
        raise JudgmentError("the request body must be a JSON object")
    unknown = sorted(obj.keys() - set(ANSWER_KEYS))
    missing = [k for k in ANSWER_KEYS[:3] if k not in obj]
    if unknown or missing:
        raise JudgmentError(f"an answer has the fields {', '.join(ANSWER_KEYS[:3])} and (optional) rt_ms" +
                            (f"; unknown: {', '.join(repr(k)[:40] for k in unknown[:5])}" if unknown else "") +
                            (f"; missing: {', '.join(missing)}" if missing else ""))
    return check_answer(obj["rater"], obj["position"], obj["side"], obj.get("rt_ms"))


def _ip_literal(name: str) -> bool:
    """Whether a Host header's name is an IP address (IPv4, or IPv6 in brackets)."""
    try:
        if name.startswith("["):
            ipaddress.IPv6Address(name[1:-1])
        else:
            ipaddress.IPv4Address(name)
    except ValueError:
        return False
    return True


def host_allowed(host: str | None, bound: str, port: int) -> bool:
    """Whether a request's ``Host`` header names a server bound to address ``bound`` and ``port``
    (see the module's docstring for which names do)."""
    m = re.fullmatch(r"(\[[0-9a-f:.]+\]|[^\[\]:]+)(?::([0-9]{1,5}))?", (host or "").strip().lower())
    if not m or int(m[2] or 80) != port:
        return False
    name, bound = m[1], bound.lower()
    if name in LOCAL_NAMES or name in (bound, f"[{bound}]"):
        return True
    if bound not in ANY_ADDRESS:
        return False
    machine = socket.gethostname().lower()
    short = machine.split(".")[0]
    return _ip_literal(name) or name in (machine, short, short + ".local")


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
    """Trials, per-rater progress and the answers file of a server; safe to call from several threads.

    Parameters
    ----------
    images, trials : the run's images and trials.
    answers : the answers file, appended to. An existing one is read, and repaired first if a crash
        left a torn last line (:func:`~brainrecon.evaluate.judgment.repair_answers`).
    seed : the seed of the raters' trial orders.
    warn : called with a message about each repair (default :func:`warnings.warn`).
    """

    def __init__(self, images: RunImages, trials: list[Trial], answers: Path, seed: int = 0,
                 warn: Warn | None = None):
        self.images, self.trials, self.answers, self.seed = images, trials, Path(answers), seed
        self.bank = ImageBank(images, seed)
        self.lock = threading.Lock()
        self.orders: dict[str, list[tuple[Trial, bool]]] = {}       # of raters who answered
        self.done: dict[str, set[str]] = {}
        ids = {t.id for t in trials}
        if self.answers.exists():
            for rec in repair_answers(self.answers, warn):
                if rec["trial"] not in ids:
                    raise JudgmentError(f"{self.answers} holds judgments of trials this run does not have "
                                        f"({rec['trial']!r}): use another --answers file, or the "
                                        "--pairs-per-image and --seed it was made with")
                self.done.setdefault(rec["rater"], set()).add(rec["trial"])
        self.answers.parent.mkdir(parents=True, exist_ok=True)

    def _order(self, rater: str) -> list[tuple[Trial, bool]]:
        return self.orders.get(rater) or rater_order(self.trials, rater, self.seed)

    def next(self, rater: str) -> dict:
        """The rater's progress and next trial: {done, total, position, recon, left, right} (addresses)."""
        rater = valid_rater(rater)
        with self.lock:
            order, done = self._order(rater), self.done.get(rater, set())
            pos = next((i for i, (t, _) in enumerate(order) if t.id not in done), None)
            out = {"done": len(done), "total": len(order), "position": pos}
            if pos is not None:
                nums = self.bank.trial_images(*order[pos])
                out.update(zip(("recon", "left", "right"), (f"image/{n}.png" for n in nums)))
            return out

    def answer(self, rater: str, position: int, side: str, rt_ms: float | None = None) -> dict:
        """Record the rater's pick (``side``: left or right) for the trial at ``position``; the next trial.

        Every field is checked (:func:`check_answer`) before anything is written; a trial the rater
        has judged already is not recorded again.
        """
        rater, position, side, rt_ms = check_answer(rater, position, side, rt_ms)
        if position >= len(self.trials):
            raise JudgmentError(f"no trial at position {position} (there are {len(self.trials)})")
        with self.lock:
            order = self._order(rater)
            trial, stimulus_left = order[position]
            if trial.id not in self.done.get(rater, set()):
                choice = trial.label if (side == "left") == stimulus_left else trial.distractor
                append_answer(self.answers, answer_record(trial, rater, choice, stimulus_left, rt_ms))
                self.orders.setdefault(rater, order)
                self.done.setdefault(rater, set()).add(trial.id)
        return self.next(rater)


class _Refusal(Exception):
    """A request answered with HTTP ``status`` and a JSON error message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _handler(session: JudgmentSession, bound: str):
    page = page_html().encode()
    json_kind = "application/json"

    class Handler(BaseHTTPRequestHandler):
        timeout = 30                        # seconds a client may take to send its request

        def log_message(self, *args):       # quiet: the command prints its own progress
            pass

        def _send(self, status: int, body: bytes, kind: str) -> None:
            try:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.send_header("X-Content-Type-Options", "nosniff")
                self.send_header("X-Frame-Options", "DENY")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)
            except OSError:                 # the client went away
                self.close_connection = True

        def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
            # the base class's own refusals (a bad request line, too long headers, an unknown method) in JSON
            self.close_connection = True
            if self.request_version == "HTTP/0.9":       # a request line it could not read: answer HTTP/1.0
                self.request_version = "HTTP/1.0"
            self._send(code, json.dumps({"error": message or HTTPStatus(code).phrase}).encode(), json_kind)

        def _reply(self, route) -> None:
            """Answer with ``route()`` (body, content type), or a JSON error: 4xx for a bad request, 500 for a bug."""
            try:
                status, (body, kind) = HTTPStatus.OK, route()
            except (_Refusal, JudgmentError) as e:
                status = e.status if isinstance(e, _Refusal) else HTTPStatus.BAD_REQUEST
                body, kind = json.dumps({"error": str(e)}).encode(), json_kind
            except Exception as e:
                log.exception("judgment server: %s %s failed", self.command, self.path)
                status, kind = HTTPStatus.INTERNAL_SERVER_ERROR, json_kind
                body = json.dumps({"error": f"the server failed ({type(e).__name__}): see its console"}).encode()
            self._send(status, body, kind)

        def _url(self):
            """The request's URL, if its Host and Origin headers are this server's (else 403)."""
            hosts = self.headers.get_all("Host") or []
            host = hosts[0] if len(hosts) == 1 else None
            if not host_allowed(host, bound, self.server.server_address[1]):
                raise _Refusal(HTTPStatus.FORBIDDEN, "this server answers only under its own address, e.g. "
                                                     f"http://localhost:{self.server.server_address[1]}/")
            origin = self.headers.get("Origin")
            if origin is not None and origin.lower() != f"http://{host.strip().lower()}":
                raise _Refusal(HTTPStatus.FORBIDDEN, "requests from other sites are refused")
            return urlparse(self.path)

        def _body(self) -> bytes:
            """The request's body (a Content-Length one, at most ``MAX_BODY`` bytes), else a refusal."""
            lengths = self.headers.get_all("Content-Length") or []
            if not lengths:
                raise _Refusal(HTTPStatus.LENGTH_REQUIRED, "Content-Length is required")
            if len(lengths) > 1 or not (lengths[0].isascii() and lengths[0].strip().isdigit()):
                raise _Refusal(HTTPStatus.BAD_REQUEST, "Content-Length must be one number")
            n = int(lengths[0])
            try:
                if n > MAX_BODY:            # read what is cheap to, so that the client gets the refusal
                    left = min(n, MAX_DRAIN)
                    while left > 0 and (chunk := self.rfile.read(min(left, 65536))):
                        left -= len(chunk)
                    raise _Refusal(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the body exceeds {MAX_BODY} bytes")
                body = self.rfile.read(n)
            except TimeoutError:
                raise _Refusal(HTTPStatus.REQUEST_TIMEOUT, "the request body did not arrive") from None
            if len(body) < n:
                raise _Refusal(HTTPStatus.BAD_REQUEST, "the request body is shorter than its Content-Length")
            return body

        def _get(self):
            url = self._url()
            if url.path in ("/", "/index.html"):
                return page, "text/html; charset=utf-8"
            if url.path == "/api/next":
                rater = parse_qs(url.query).get("rater", [""])[0]
                return json.dumps(session.next(rater)).encode(), json_kind
            image = re.fullmatch(r"/image/([0-9]{1,9})\.png", url.path)
            if image and int(image[1]) in session.bank.by_number:
                return session.bank.png(int(image[1])), "image/png"
            raise _Refusal(HTTPStatus.NOT_FOUND, "not found")

        def _post(self):
            body = self._body()             # first, so that no refusal leaves a body unread
            if self._url().path != "/api/answer":
                raise _Refusal(HTTPStatus.NOT_FOUND, "not found")
            if self.headers.get_content_type() != json_kind:
                raise _Refusal(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "an answer is sent as application/json")
            return json.dumps(session.answer(*parse_answer(body))).encode(), json_kind

        def _not_allowed(self):
            raise _Refusal(HTTPStatus.METHOD_NOT_ALLOWED, f"{self.command} is not supported: GET or POST")

        def do_GET(self):
            self._reply(self._get)

        def do_POST(self):
            self._reply(self._post)

        def do_OTHER(self):
            self._reply(self._not_allowed)

        do_HEAD = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_OTHER

    return Handler


def make_server(session: JudgmentSession, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """A server for ``session`` (not started: call ``serve_forever``); port 0 picks a free one."""
    return ThreadingHTTPServer((host, port), _handler(session, host))


def export_page(images: RunImages, trials: list[Trial], rater: str, path: Path, seed: int = 0) -> Path:
    """A self-contained page of all ``trials`` for one rater, in that rater's order (as the server's)."""
    if not str(rater).strip():
        raise JudgmentError("a static page is made for one rater: give their name")
    rater = valid_rater(rater)
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
    path.write_text(page_html({"key": key, "rater": rater, "trials": rows, "images": uris}), encoding="utf-8")
    return path
