"""Human-judgment identification: trials, answers, scores, the web server and the static page."""
import base64
import contextlib
import http.client
import io
import json
import socket
import threading
import urllib.error
import urllib.request
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from brainrecon.cli import app
from brainrecon.evaluate.identification import pairwise_identification
from brainrecon.evaluate.judgment import (JudgmentError, Trial, answer_record, make_trials, rater_order,
                                          read_answers, run_images, score_answers)
from brainrecon.evaluate.judgment_app import JudgmentSession, export_page, host_allowed, make_server, page_html


def _save(array, path):
    Image.fromarray((array.transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(path)


@pytest.fixture
def run_dir(tmp_path):
    """A finished run in miniature: 6 + 4 stimuli (24 px) and noisy 16 px reconstructions of them."""
    rng = np.random.default_rng(0)
    images = tmp_path / "stimuli"
    images.mkdir()
    run = tmp_path / "run"
    for name, n in (("natural", 6), ("letters", 4)):
        (run / "recon" / name).mkdir(parents=True)
        for i in range(n):
            stim = np.kron(rng.random((3, 6, 6)), np.ones((1, 4, 4)))              # blocky, 24 px
            _save(stim, images / f"{name}_{i}.png")
            noisy = stim + np.kron(rng.normal(0, 3.0, (3, 6, 6)), np.ones((1, 4, 4)))   # noise at the blocks' scale
            recon = np.clip(noisy[:, ::3, ::3].repeat(2, 1).repeat(2, 2), 0, 1)
            _save(recon, run / "recon" / name / f"{name}_{i}.png")
    (run / "run.json").write_text(json.dumps({"images": str(images)}))
    (run / "metrics.json").write_text(json.dumps({"natural": {"pixel_identification": 0.5}}))
    return run


def test_trials_every_pair_or_a_seeded_draw():
    labels = {"a": ["a0", "a1", "a2", "a3"], "b": ["b0", "b1", "b2"]}
    trials = make_trials(labels)
    assert len(trials) == 4 * 3 + 3 * 2 and len({t.id for t in trials}) == len(trials)
    assert {(t.label, t.distractor) for t in trials if t.test_set == "b"} == {
        (x, y) for x in labels["b"] for y in labels["b"] if x != y}
    drawn = make_trials(labels, pairs_per_image=2, seed=3)
    assert len(drawn) == 4 * 2 + 3 * 2
    assert all(t.distractor != t.label and t.distractor[0] == t.test_set for t in drawn)
    for lab in labels["a"]:
        assert len({t.distractor for t in drawn if t.label == lab}) == 2
    assert drawn == make_trials(labels, pairs_per_image=2, seed=3)
    with pytest.raises(JudgmentError, match="at least 1"):
        make_trials(labels, pairs_per_image=0)


def test_rater_order_is_a_fixed_permutation_per_rater():
    trials = make_trials({"s": [f"x{i}" for i in range(11)]})              # 110 trials
    a, b = rater_order(trials, "ann"), rater_order(trials, "bob")
    assert sorted(t.id for t, _ in a) == sorted(t.id for t in trials)
    assert a == rater_order(trials, "ann") and [t for t, _ in a] != [t for t, _ in b]
    assert 35 <= sum(left for _, left in a) <= 75                            # sides balanced, not fixed


def test_scores_on_a_hand_computed_case():
    trials = make_trials({"s": ["p", "q", "r"]})                             # 6 trials
    t = {x.id: x for x in trials}
    marks = {("ann", "s/p/q"): "p", ("ann", "s/p/r"): "r", ("ann", "s/q/p"): "q", ("ann", "s/q/r"): "q",
             ("ann", "s/r/p"): "r", ("ann", "s/r/q"): "q", ("bob", "s/p/q"): "p", ("bob", "s/r/q"): "r"}
    answers = [answer_record(t[i], who, c, True) for (who, i), c in marks.items()]
    answers.append(answer_record(t["s/p/q"], "ann", "q", False))           # a repeat: the first judgment counts
    s = score_answers(trials, answers)["s"]
    assert s["human_identification"] == pytest.approx(6 / 8)
    assert (s["n_judgments"], s["n_raters"], s["trials_covered"]) == (8, 2, 1.0)
    assert s["per_rater"] == pytest.approx({"ann": 4 / 6, "bob": 1.0})
    assert s["per_image"] == pytest.approx({"p": 2 / 3, "q": 1.0, "r": 2 / 3})
    z, p, n = 1.959963984540054, 6 / 8, 8                                   # Wilson score interval
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert s["ci95"] == pytest.approx([centre - half, centre + half], abs=1e-9)


def test_bad_answers_are_named(tmp_path):
    trials = make_trials({"s": ["p", "q"]})
    with pytest.raises(JudgmentError, match="not a candidate"):
        answer_record(trials[0], "ann", "r", True)
    with pytest.raises(JudgmentError, match="not a trial of this run"):
        score_answers(trials, [{"trial": "s/p/zz", "rater": "ann", "choice": "p"}])
    bad = tmp_path / "a.jsonl"
    bad.write_text(json.dumps(answer_record(trials[0], "ann", "p", True)) + "\n{oops\n")
    with pytest.raises(JudgmentError, match="a.jsonl, line 2"):
        read_answers(bad)


def _small(png: bytes, size: int = 16) -> np.ndarray:
    im = Image.open(io.BytesIO(png)).convert("RGB")
    return np.asarray(im.resize((size, size), Image.BOX), np.float64).transpose(2, 0, 1)


def test_server_with_a_pixel_correlation_rater_gives_pixel_identification(run_dir):
    imgs = run_images(run_dir)
    trials = make_trials(imgs.labels)
    answers = run_dir / "judgments" / "answers.jsonl"
    session = JudgmentSession(imgs, trials, answers)
    server = make_server(session, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}/"

    def get(url):
        return urllib.request.urlopen(base + url).read()

    def post(body):
        req = urllib.request.Request(base + "api/answer", json.dumps(body).encode(), {"Content-Type": "application/json"})
        return json.loads(urllib.request.urlopen(req).read())

    try:
        assert b"resemble" in get("")
        nxt = json.loads(get("api/next?rater=pix"))
        assert (nxt["done"], nxt["total"]) == (0, 6 * 5 + 4 * 3)
        assert not any(lab in nxt[k] for k in ("recon", "left", "right") for lab in ("natural", "letters"))
        with pytest.raises(urllib.error.HTTPError) as e:
            post({"rater": "pix", "position": nxt["position"], "side": "up"})
        assert e.value.code == 400 and "left or right" in json.loads(e.value.read())["error"]
        while nxt["position"] is not None:                                  # pick the higher pixel correlation
            r, left, right = (_small(get(nxt[k])) for k in ("recon", "left", "right"))
            corr = [np.corrcoef(r.ravel(), c.ravel())[0, 1] for c in (left, right)]
            nxt = post({"rater": "pix", "position": nxt["position"], "side": "left" if corr[0] > corr[1] else "right"})
        assert nxt["done"] == nxt["total"] == len(trials)
    finally:
        server.shutdown()
        server.server_close()
    scores = score_answers(trials, read_answers(answers))
    for name, labels in imgs.labels.items():
        recon = np.stack([_small(imgs.recon[name][lab].read_bytes()) for lab in labels])
        stim = np.stack([_small(session.bank.png(session.bank.number[("stimulus", name, lab)])) for lab in labels])
        expected = pairwise_identification(recon, stim).mean()
        assert 0.6 < expected < 1.0                                         # a case that can fail either way
        assert scores[name]["human_identification"] == pytest.approx(expected, abs=1e-12)
    resumed = JudgmentSession(imgs, trials, answers).next("pix")           # a restarted server remembers
    assert resumed["position"] is None and resumed["done"] == len(trials)
    assert JudgmentSession(imgs, trials, answers).next("new")["done"] == 0


def test_static_page_holds_the_raters_trials(run_dir, tmp_path):
    imgs = run_images(run_dir)
    trials = make_trials(imgs.labels, pairs_per_image=2)
    page = export_page(imgs, trials, "ann", tmp_path / "ann.html").read_text()
    config = json.loads(page.split("const CONFIG = ")[1].split(";\nconst $")[0])
    assert config["rater"] == "ann"
    assert [(r["id"], r["stimulus_left"]) for r in config["trials"]] == [(t.id, left) for t, left in rater_order(trials, "ann")]
    assert len(config["images"]) == 10 + 10                                 # every reconstruction and stimulus, once
    first = config["trials"][0]
    stim = config["images"][first["left" if first["stimulus_left"] else "right"]]
    label = Trial(*first["id"].split("/")).label
    assert _small(base64.b64decode(stim.split(",")[1])).shape == (3, 16, 16)
    assert stim.startswith("data:image/png;base64,") and label in imgs.stimuli[first["test_set"]]


def test_cli_scores_answers_into_metrics(run_dir):
    imgs = run_images(run_dir)
    trials = make_trials(imgs.labels)
    answers = run_dir / "judgments" / "answers.jsonl"
    answers.parent.mkdir()
    # a rater who is right on the natural images' first half of trials and wrong on the rest
    nat = [t for t in trials if t.test_set == "natural"]
    answers.write_text("".join(json.dumps(answer_record(t, "ann", t.label if i < 12 else t.distractor, True)) + "\n"
                               for i, t in enumerate(nat)))
    result = CliRunner().invoke(app, ["judge", "score", str(run_dir)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["natural"]["human_identification"] == pytest.approx(12 / 30)
    assert metrics["natural"]["human_n_judgments"] == 30 and "letters" not in metrics
    assert metrics["natural"]["pixel_identification"] == 0.5                # the run's own numbers are kept
    assert json.loads((run_dir / "human_judgment.json").read_text())["natural"]["trials_covered"] == 1.0
    missing = CliRunner().invoke(app, ["judge", "score", str(run_dir / "nope")])
    assert missing.exit_code == 2 and "does not exist" in missing.output


@contextlib.contextmanager
def _serving(session):
    server = make_server(session, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def _request(port, method, path, body=None, headers=None, host=None, length=True):
    """(status, body) of a raw request: ``host`` replaces the Host header ("": none), ``length=False``
    sends no Content-Length."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        if host != "":
            conn.putheader("Host", host or f"127.0.0.1:{port}")
        for key, value in (headers or {}).items():
            conn.putheader(key, value)
        if body is not None and length:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _post(port, body, content_type="application/json", **kw):
    body = body if isinstance(body, bytes) else json.dumps(body).encode()
    return _request(port, "POST", "/api/answer", body, {"Content-Type": content_type, **kw.pop("headers", {})}, **kw)


def _refused(reply, status):
    """The error message of a refusal with ``status`` and a JSON body {"error": message}."""
    assert reply[0] == status, reply
    message = json.loads(reply[1])["error"]
    assert isinstance(message, str) and message
    return message


def _judging(run_dir):
    """A session whose answers file holds one judgment, that file and its bytes."""
    imgs = run_images(run_dir)
    answers = run_dir / "judgments" / "answers.jsonl"
    session = JudgmentSession(imgs, make_trials(imgs.labels), answers)
    session.answer("ann", 0, "left")
    return session, answers, answers.read_bytes()


def test_server_refuses_other_sites_and_other_host_names(run_dir):
    session, answers, before = _judging(run_dir)
    eve = {"rater": "eve", "position": 0, "side": "left"}
    with _serving(session) as port:
        assert "application/json" in _refused(_post(port, eve, "text/plain"), 415)     # a "simple" cross-site POST
        _refused(_post(port, eve, "application/x-www-form-urlencoded"), 415)
        _refused(_post(port, eve, headers={"Origin": "http://evil.example"}), 403)
        _refused(_post(port, eve, headers={"Origin": "null"}), 403)
        _refused(_post(port, eve, headers={"Origin": f"http://localhost:{port}"}), 403)  # Host is 127.0.0.1
        for host in (f"evil.example:{port}", f"127.0.0.1:{port + 1}", "127.0.0.1", ""):   # DNS rebinding, ports
            _refused(_post(port, eve, host=host), 403)
            _refused(_request(port, "GET", "/api/next?rater=ann", host=host), 403)
            _refused(_request(port, "GET", "/", host=host), 403)
        _refused(_request(port, "PUT", "/api/answer", b"{}"), 405)
        assert answers.read_bytes() == before and set(session.done) == {"ann"}
        for host in (f"localhost:{port}", f"[::1]:{port}", f"LOCALHOST:{port}"):
            status, body = _request(port, "GET", "/api/next?rater=ann", host=host)
            assert status == 200 and json.loads(body)["done"] == 1
        status, body = _post(port, eve, host=f"localhost:{port}", headers={"Origin": f"http://localhost:{port}"})
        assert status == 200 and json.loads(body)["done"] == 1
    assert [r["rater"] for r in read_answers(answers)] == ["ann", "eve"]
    machine = socket.gethostname()
    for host, bound, ok in [("192.168.1.7:8000", "0.0.0.0", True), ("[fe80::1]:8000", "0.0.0.0", True),
                            (f"{machine}:8000", "0.0.0.0", True), ("evil.example:8000", "0.0.0.0", False),
                            ("192.168.1.7:8001", "0.0.0.0", False), ("192.168.1.7:8000", "127.0.0.1", False),
                            ("192.168.1.7:8000", "192.168.1.7", True), ("localhost", "127.0.0.1", False),
                            ("[1.2.3.4]:8000", "0.0.0.0", False), (None, "0.0.0.0", False)]:
        assert host_allowed(host, bound, 8000) is ok, (host, bound)
    assert host_allowed("localhost", "127.0.0.1", 80)


def test_server_checks_every_field_before_writing(run_dir):
    session, answers, before = _judging(run_dir)
    good = {"rater": "bob", "position": 0, "side": "left"}
    bad = [{**good, "rater": ""}, {**good, "rater": "  "}, {**good, "rater": None}, {**good, "rater": 7},
           {**good, "rater": "x" * 101}, {**good, "rater": "a\nb"}, {**good, "rater": "a\x00"},
           {**good, "position": True}, {**good, "position": -1}, {**good, "position": 1.0},
           {**good, "position": "0"}, {**good, "position": 10 ** 6}, {**good, "side": "up"}, {**good, "side": None},
           {**good, "rt_ms": -5}, {**good, "rt_ms": "fast"}, {**good, "rt_ms": True}, {**good, "rt_ms": 3_600_001},
           {**good, "extra": 1}, {"rater": "bob", "position": 0}, [good],
           b'{"rater": "bob", "position": 0, "side": "left", "rt_ms": 1e999}',
           b'{"rater": "bob", "position": 0, "side": "left", "rt_ms": NaN}',
           b'{"rater": "bob", "position": 1' + b"0" * 5000 + b', "side": "left"}',
           b"not json", b"\xff\xfe{", b"", b"[" * 10000, b"null"]
    with _serving(session) as port:
        for body in bad:
            _refused(_post(port, body), 400)
        _refused(_post(port, good, length=False), 411)
        for length in ("abc", "-1", "1e3"):
            _refused(_post(port, good, length=False, headers={"Content-Length": length}), 400)
        assert "16384" in _refused(_post(port, {**good, "pad": "x" * 20000}), 413)
        for query in ("", "?rater=", "?rater=%20%20", "?rater=a%00b", "?rater=" + "x" * 101):
            _refused(_request(port, "GET", "/api/next" + query), 400)
        _refused(_request(port, "GET", "/image/99999.png"), 404)
        assert answers.read_bytes() == before
        assert set(session.done) == {"ann"} and set(session.orders) == {"ann"}     # nothing kept of the rest
        for args in [("", 0, "left"), (None, 0, "left"), ("bob", True, "left"), ("bob", 0, "left", float("inf"))]:
            with pytest.raises(JudgmentError):
                session.answer(*args)
        assert answers.read_bytes() == before
        status, _ = _post(port, {**good, "rt_ms": 1234.4})
    assert status == 200 and read_answers(answers)[-1]["rt_ms"] == 1234


def test_a_torn_last_line_is_dropped_with_a_warning(run_dir):
    imgs = run_images(run_dir)
    trials = make_trials(imgs.labels)
    answers = run_dir / "judgments" / "answers.jsonl"
    answers.parent.mkdir()
    lines = "".join(json.dumps(answer_record(t, "ann", t.label, True)) + "\n" for t in trials[:2])
    torn = '{"trial": "natural/natural_0/natural_1", "rater": "bob", "choice": "natural_1", "corr'
    answers.write_text(lines + torn)
    before = answers.read_bytes()
    messages = []
    assert [r["trial"] for r in read_answers(answers, warn=messages.append)] == [t.id for t in trials[:2]]
    assert len(messages) == 1 and "answers.jsonl, line 3" in messages[0] and torn[:60] in messages[0]
    assert torn[:61] not in messages[0]                                      # the line's start, not all of it
    result = CliRunner().invoke(app, ["judge", "score", str(run_dir)])
    assert result.exit_code == 0, result.output
    warning = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and f"{answers}, line 3: dropped a torn last line" in warning[0]   # one line, whole
    assert json.loads((run_dir / "metrics.json").read_text())[trials[0].test_set]["human_n_judgments"] == 2
    assert answers.read_bytes() == before                                   # reading repairs nothing
    answers.write_text(lines + torn + "\n" + lines)                          # a bad line in the middle
    before = answers.read_bytes()
    with pytest.raises(JudgmentError, match="answers.jsonl, line 3"):
        read_answers(answers)
    with pytest.raises(JudgmentError, match="answers.jsonl, line 3"):
        JudgmentSession(imgs, trials, answers)
    assert answers.read_bytes() == before


def test_the_server_repairs_a_torn_answers_file_before_appending(run_dir):
    imgs = run_images(run_dir)
    trials = make_trials(imgs.labels)
    answers = run_dir / "judgments" / "answers.jsonl"
    answers.parent.mkdir()
    line = json.dumps(answer_record(trials[0], "ann", trials[0].label, True)) + "\n"
    answers.write_text(line + '{"trial": "natural/a/b", "rat')
    messages = []
    session = JudgmentSession(imgs, trials, answers, warn=messages.append)
    assert len(messages) == 1 and "line 2" in messages[0] and "answers.jsonl.torn" in messages[0]
    assert answers.read_text() == line
    assert (answers.parent / "answers.jsonl.torn").read_text() == '{"trial": "natural/a/b", "rat\n'
    assert session.done == {"ann": {trials[0].id}}
    session.answer("bob", 0, "right")
    assert [r["rater"] for r in read_answers(answers, warn=pytest.fail)] == ["ann", "bob"]
    answers.write_text(line.rstrip("\n"))                                   # a whole last line, without its newline
    JudgmentSession(imgs, trials, answers, warn=pytest.fail).answer("bob", 0, "right")
    assert [r["rater"] for r in read_answers(answers, warn=pytest.fail)] == ["ann", "bob"]


class _Scripts(HTMLParser):
    def __init__(self):
        super().__init__()
        self.scripts, self._inside = [], False

    def handle_starttag(self, tag, attrs):
        if tag == "script":
            self._inside = True
            self.scripts.append("")

    def handle_endtag(self, tag):
        self._inside = self._inside and tag != "script"

    def handle_data(self, data):
        if self._inside:
            self.scripts[-1] += data


def _config(page):
    parser = _Scripts()
    parser.feed(page)
    [script] = parser.scripts
    assert "<!--" not in script and "<script" not in script.lower() and "</" not in script
    assert "\u2028" not in script and "\u2029" not in script
    return json.loads(script.split("const CONFIG = ")[1].split(";\nconst $")[0])


def test_static_page_escapes_its_config_for_the_script(run_dir, tmp_path):
    imgs = run_images(run_dir)
    trials = make_trials(imgs.labels, pairs_per_image=1)
    rater = "a<!--<script>"
    config = _config(export_page(imgs, trials, rater, tmp_path / "a.html").read_text())
    assert config["rater"] == rater and config["key"].startswith(rater)
    tricky = {"x": "</script><!-- <SCRIPT> & > \u2028\u2029 ]]>"}
    assert _config(page_html(tricky)) == tricky
    script = page_html().split("<script>")[1]
    assert not any(w in script for w in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write"))
    assert "textContent = body.error" in script
