"""The server against hostile clients: ``vdeploy serve`` (a subprocess on 127.0.0.1, the tiny text-conditioned
model, an API key, ``--metrics-open``, ``--max-videos 2``, ``--client-timeout 2``) fed hypothesis-generated
JSON bodies (every answer 2xx or 4xx, never 5xx), oversized, deeply nested, slow, stalled and abandoned
uploads, wrong content types and missing or wrong keys. Then the server still answers, logged no traceback,
and its resident memory is within ``RSS_BOUND`` of what it was after a warm-up.

CI mode: ``COUNTS[0]`` generated bodies; ``pytest tests/test_serve_hostile.py --reliability-full``: ``COUNTS[1]``
(the option of tests/reliability, declared in tests/conftest.py). Every loop is bounded; sockets time out.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

pytest.importorskip("starlette", reason="the serving extra is not installed: pip install 'vdeploy[serve]'")
pytest.importorskip("uvicorn", reason="the serving extra is not installed: pip install 'vdeploy[serve]'")
psutil = pytest.importorskip("psutil")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from runtime_fixtures import COND_DIM, VIDEO, model_dir  # noqa: E402
from serve_fixtures import wait_for  # noqa: E402

from vdeploy.runtime.samplers import SAMPLERS, sampler_options  # noqa: E402
from vdeploy.runtime.serve import limits  # noqa: E402
from vdeploy.runtime.serve.requests import MAX_PROMPT_CHARS, fields  # noqa: E402

KEY = "k" * 8 + "-hostile-suite-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
JSON = {"Content-Type": "application/json"}
MAX_VIDEOS = 2
CLIENT_TIMEOUT = 2.0  # the server's --client-timeout: the slow-client tests wait about this long
COUNTS = (300, 3000)  # generated bodies: CI, full mode
# RSS after the suite minus RSS after the warm-up. The warm-up runs every shape the suite can make (1 and 2
# videos, guided and not, known frames) so the backend's arenas have grown; what is left is Python's heap
# and allocator caches (a leak of the bodies would show: the suite sends tens of MB in total).
RSS_BOUND = 48 * 2**20
SHAPE = (VIDEO["channels"], VIDEO["num_frames"], VIDEO["image_size"], VIDEO["image_size"])
TALLY = {"bodies": 0, "5xx": 0, "statuses": {}}


# ------------------------------------------------------------------------------------------- the server --


class Server:
    def __init__(self, proc: subprocess.Popen, port: int, log_path):
        self.proc, self.port, self.log_path = proc, port, log_path
        self.rss_start: int | None = None

    def rss(self) -> int:
        return psutil.Process(self.proc.pid).memory_info().rss

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def request(self, method, path, body=None, headers=AUTH, timeout=60):
        """(status, headers with lower-case names, body bytes); a dict body is sent as JSON."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            if isinstance(body, (dict, list)):
                body = json.dumps(body).encode()
                headers = {**JSON, **headers}
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            conn.close()

    def post(self, body, headers=None):
        return self.request("POST", "/v1/videos", body, {**JSON, **AUTH, **(headers or {})})

    def raw(self, head: bytes) -> socket.socket:
        """A socket that has sent ``head`` (the caller sends the rest)."""
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        sock.sendall(head)
        return sock


def _head(length=None, chunked=False, content_type=b"application/json") -> bytes:
    lines = [b"POST /v1/videos HTTP/1.1", b"Host: 127.0.0.1", b"Authorization: Bearer " + KEY.encode(),
             b"Content-Type: " + content_type]
    if length is not None:
        lines.append(b"Content-Length: %d" % length)
    if chunked:
        lines.append(b"Transfer-Encoding: chunked")
    return b"\r\n".join(lines) + b"\r\n\r\n"


def _response(sock: socket.socket) -> tuple[int, bytes]:
    """Read one HTTP response from a raw socket: (status, body); (0, b"") if the server closed first."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return 0, b""
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = int(next((line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")),
                      b"0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return int(head.split(b" ")[1]), rest


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    (folder / "key").write_text(KEY + "\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_path = folder / "server.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("VDEPLOY_API_KEY", None)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vdeploy.cli", "serve", "--model", str(model_dir("cond")), "--host", "127.0.0.1",
             "--port", str(port), "--backend", "cpu", "--threads", "1", "--batching", "off",
             "--max-videos", str(MAX_VIDEOS), "--client-timeout", str(CLIENT_TIMEOUT), "--max-queue", "16",
             "--api-key-file", str(folder / "key"), "--metrics-open"],
            stdout=log, stderr=subprocess.STDOUT, env=env)
    server = Server(proc, port, log_path)
    try:
        wait_for(lambda: _ready(server) or proc.poll() is not None, timeout=60, what="vdeploy serve to be ready")
        assert proc.poll() is None, server.log()
        _warm_up(server)
        server.rss_start = server.rss()
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _ready(server) -> bool:
    try:
        return server.request("GET", "/readyz", timeout=2)[0] == 200
    except OSError:
        return False


def _warm_up(server):
    frames = np.full((MAX_VIDEOS, *SHAPE[:1], 2, *SHAPE[2:]), 0.5).tolist()
    for body in ({"steps": 2, "format": "npy"}, {"prompt": ["a red ball", "a blue cube"], "steps": 2, "cond_scale": 2},
                 {"cond": [[0.1] * COND_DIM] * 2, "steps": 2, "format": "gif"},
                 {"frames": frames, "steps": 2, "format": "mp4", "prompt": "a ball", "cond_scale": 3},
                 {"frames": frames[0], "known_mask": [True, False, True, False], "steps": 2, "resample": 1,
                  "sampler": "ddpm"}, {"steps": 2, "async": True}, {"stpes": 2}):
        status, _, raw = server.post(body)
        assert status in (200, 202, 422), (body, raw[:300])


# ------------------------------------------------------------------------------------- generated bodies --

HUGE = [10**400, -(10**400), 2**63, 2**64 + 1]  # (a 5000-digit number: test_deep_nesting...)
junk = st.one_of(
    st.none(), st.booleans(), st.integers(), st.sampled_from(HUGE), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8), st.lists(st.integers(-2, 2), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(),
                                                                                      max_size=2))
finite = st.floats(-3, 3)


def _frames(shape):
    return st.builds(lambda seed: np.random.default_rng(seed).uniform(0, 1, shape).round(3).tolist(), st.integers(0, 99))


frame_shapes = st.sampled_from([(3, 1, 8, 8), (3, 2, 8, 8), (1, 3, 3, 8, 8), (2, 3, 1, 8, 8), (3, 3, 4, 8, 8),
                                (3, 2, 8, 4), (3, 5, 8, 8), (1, 1, 1, 1)])
FIELD_VALUES = {
    "prompt": st.one_of(st.sampled_from(["a red ball", "", " ", "a" * (MAX_PROMPT_CHARS + 1), "[[[[[[[[[[", "\u0000",
                                         "é😀\u202e"]), st.text(max_size=20),
                        st.lists(st.sampled_from(["a red ball", "left", ""]), max_size=3), junk),
    "cond": st.one_of(st.lists(finite, min_size=COND_DIM, max_size=COND_DIM),
                      st.lists(st.lists(finite, min_size=COND_DIM, max_size=COND_DIM), min_size=1, max_size=3),
                      st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=COND_DIM + 1), junk),
    "sampler": st.one_of(st.sampled_from([*SAMPLERS, "euler", "DDIM"]), junk),
    "steps": st.one_of(st.integers(1, 3), st.integers(-2, 60), junk),
    "seed": st.one_of(st.integers(0, 2**64), junk),
    "cond_scale": st.one_of(finite, junk),
    "batch_size": st.one_of(st.integers(0, MAX_VIDEOS + 1), junk),
    "frames": st.one_of(frame_shapes.flatmap(_frames), junk),
    "known_mask": st.one_of(st.lists(st.booleans(), min_size=1, max_size=5),
                            st.lists(st.lists(st.booleans(), min_size=4, max_size=4), min_size=1, max_size=3), junk),
    "resample": st.one_of(st.integers(0, 2), junk),
    "conditioning": st.one_of(st.sampled_from(["auto", "trained", "replacement", "x"]), junk),
    "format": st.one_of(st.sampled_from(["npy", "gif", "mp4", "webm"]), junk),
    "fps": st.one_of(st.floats(0, 200), junk),
    "async": st.one_of(st.booleans(), junk),
}
option_values = st.one_of(st.sampled_from(["trailing", "leading", "linspace", "logsnr", "karras"]), st.integers(-1, 4),
                          finite, junk)
for _name in sampler_options():
    FIELD_VALUES.setdefault(_name, option_values)
assert set(FIELD_VALUES) == set(fields()), "a request field the generator does not know"

json_values = st.recursive(junk, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.sampled_from([*fields(), "x", ""]), inner, max_size=3), max_leaves=10)
request_bodies = st.fixed_dictionaries({}, optional=FIELD_VALUES)


def _encode(value) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


bodies = st.one_of(
    request_bodies.map(_encode),  # the fields, each valid or not
    st.tuples(request_bodies, st.text(max_size=6), json_values).map(lambda t: _encode({**t[0], t[1]: t[2]})),
    json_values.map(_encode),  # any JSON at all
    st.tuples(request_bodies.map(_encode), st.integers(0, 200), st.binary(max_size=4)).map(  # broken JSON
        lambda t: t[0][:t[1]] + t[2] + t[0][t[1]:]),
    st.binary(max_size=64),
    st.integers(1, 3000).map(lambda n: b"[" * n + b"]" * (n % 7)),  # deep and unbalanced
)


def test_generated_bodies_never_get_a_5xx(server, request):
    full = bool(request.config.getoption("--reliability-full"))

    @settings(max_examples=COUNTS[1] if full else COUNTS[0], deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(bodies)
    def check(body):
        status, headers, raw = server.post(body)
        TALLY["bodies"] += 1
        TALLY["statuses"][status] = TALLY["statuses"].get(status, 0) + 1
        TALLY["5xx"] += status >= 500
        assert status in (200, 202, 422, 429), (status, body[:300], raw[:500])
        assert headers.get("x-request-id"), headers
        if status in (422, 429):
            assert headers["content-type"] == "application/json" and json.loads(raw)["error"]

    check()
    print(f"\nhostile suite: {TALLY['bodies']} generated bodies, {TALLY['5xx']} answered 5xx; "
          f"statuses {dict(sorted(TALLY['statuses'].items()))}")
    assert server.request("GET", "/healthz")[0] == 200


# ----------------------------------------------------------------------------------------- size, depth --


def test_a_body_past_the_limit_is_413_before_it_is_read(server):
    limit = limits.default_max_body(SHAPE, COND_DIM, MAX_VIDEOS, MAX_PROMPT_CHARS)
    # headers only: the answer comes without a byte of the body sent
    sock = server.raw(_head(length=limit + 1))
    status, raw = _response(sock)
    sock.close()
    answer = json.loads(raw)
    assert status == 413 and f"limit of {limit} bytes" in answer["error"] and "--max-body" in answer["error"], answer
    # chunked: refused once the streamed bytes pass the limit, the body never finished (no last chunk sent)
    sock = server.raw(_head(chunked=True))
    chunk = b"[" + b"0.5, " * 8000
    for _ in range(limit // len(chunk) + 1):  # just past the limit: the server reads all that was sent
        sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))  # (unread bytes would turn its close into a reset)
    status, raw = _response(sock)
    sock.close()
    assert status == 413 and f"limit of {limit} bytes" in json.loads(raw)["error"]
    # the largest legal request fits: 2 videos of 4 known frames with the longest float reprs
    frames = np.full((MAX_VIDEOS, SHAPE[0], SHAPE[1], *SHAPE[2:]), -2.2250738585072014e-308).tolist()
    body = json.dumps({"frames": frames, "known_mask": [[True] * SHAPE[1]] * MAX_VIDEOS,
                       "prompt": ["\U0001F600" * MAX_PROMPT_CHARS] * MAX_VIDEOS}).encode()
    assert len(body) <= limit
    status, _, raw = server.post(body)
    assert status == 422 and json.loads(raw)["field"] is not None, raw[:300]  # read, then checked field by field


def test_deep_nesting_is_422_and_brackets_in_strings_do_not_count(server):
    for body in (b"[" * 100_000, b'{"frames": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
                 json.dumps({"frames": [[[[[[0.5]]]]]]}).encode()):
        status, _, raw = server.post(body)
        answer = json.loads(raw)
        assert status == 422 and "levels deep" in answer["error"] and "at most 6" in answer["error"], answer
    status, _, raw = server.post({"prompt": "[" * 100, "steps": 1, "format": "npy", "seed": 1})
    assert status == 200, raw[:300]
    status, _, raw = server.post({"frames": [[[[[0.5]]]]]})  # 6 levels: read, then refused for its shape
    assert status == 422 and json.loads(raw)["field"] == "frames"
    status, _, raw = server.post(b'{"seed": ' + b"9" * 5000 + b"}")
    assert status == 422 and "must fit a float64" in json.loads(raw)["error"]
    status, _, raw = server.post({"cond_scale": 10**400})  # past float64: refused as read, not as an OverflowError
    assert status == 422 and "401 digits" in json.loads(raw)["error"]


# ------------------------------------------------------------------------------------ slow and abusive --


def test_slow_stalled_and_abandoned_uploads(server):
    body = json.dumps({"steps": 1, "format": "npy", "seed": 2, "prompt": "a red ball " * 40}).encode()
    # slow but steady (pauses under --client-timeout): served; /healthz answers meanwhile
    sock = server.raw(_head(length=len(body)))
    pieces = [body[i:i + 100] for i in range(0, len(body), 100)]
    for piece in pieces:  # a pause of max(CLIENT_TIMEOUT / 8, one /healthz call) after each piece
        sock.sendall(piece)
        began = time.monotonic()
        assert server.request("GET", "/healthz", headers={}, timeout=10)[0] == 200
        time.sleep(max(0.0, CLIENT_TIMEOUT / 8 - (time.monotonic() - began)))
    status, _ = _response(sock)
    sock.close()
    assert status == 200
    # stalled: 408 once the body pauses longer than --client-timeout
    sock = server.raw(_head(length=len(body)) + body[:50])
    status, raw = _response(sock)
    sock.close()
    assert status == 408 and "stopped arriving" in json.loads(raw)["error"]
    # a slow head (slowloris): the connection is closed without an answer
    sock = server.raw(b"POST /v1/videos HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    assert _response(sock) == (0, b"")
    sock.close()
    # abandoned mid-upload, a few times over: nothing is kept (the memory test below checks)
    for _ in range(5):
        sock = server.raw(_head(length=len(body) * 10) + body)
        sock.close()
    wait_for(lambda: server.request("GET", "/healthz", headers={})[0] == 200, what="the server")


def test_wrong_content_types(server):
    body = json.dumps({"steps": 1, "format": "npy"}).encode()
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                         "application/json; charset=latin-1", "application/jsonx", ""):
        status, headers, raw = server.request("POST", "/v1/videos", body, {**AUTH, "Content-Type": content_type})
        assert status == 415 and "application/json" in json.loads(raw)["error"], (content_type, raw)
        assert headers["connection"] == "close"
    assert server.post(body, {"Content-Type": "Application/JSON; charset=UTF-8"})[0] == 200


def test_missing_and_wrong_keys(server):
    body = {"steps": 1, "format": "npy"}
    for headers, why in (({}, "needs an API key"), ({"Authorization": "Bearer wrong"}, "the API key is wrong"),
                         ({"Authorization": f"Bearer {KEY}x"}, "wrong"), ({"Authorization": KEY}, "Bearer <key>"),
                         ({"Authorization": f"Basic {KEY}"}, "Bearer <key>"), ({"Authorization": "Bearer "}, "Bearer")):
        for method, path, data in (("POST", "/v1/videos", body), ("GET", "/readyz", None),
                                   ("GET", "/v1/videos/x", None), ("DELETE", "/v1/videos/x", None),
                                   ("GET", "/nowhere", None)):
            status, answer, raw = server.request(method, path, data, headers)
            assert status == 401 and why in json.loads(raw)["error"], (headers, path, raw)
            assert answer["www-authenticate"].startswith("Bearer") and answer["x-request-id"]
    assert server.request("GET", "/healthz", headers={})[0] == 200  # open: a liveness probe
    assert server.request("GET", "/metrics", headers={})[0] == 200  # --metrics-open
    assert server.request("GET", "/readyz", headers={"Authorization": f"bearer {KEY}"})[0] == 200
    status, headers, raw = server.request("GET", "/nowhere")
    assert status == 404 and json.loads(raw)["error"] and headers["x-request-id"]
    status, headers, _ = server.request("GET", "/healthz", headers={"X-Request-Id": "trace-42"})
    assert headers["x-request-id"] == "trace-42"
    status, headers, _ = server.request("GET", "/healthz", headers={"X-Request-Id": "no spaces\u00e9"})
    assert len(headers["x-request-id"]) == 32  # a client id that is not a short token is replaced


def test_the_server_is_alive_logged_no_traceback_and_kept_its_memory(server):
    status, _, raw = server.post({"prompt": "a red ball", "steps": 2, "format": "npy", "seed": 0})
    assert status == 200 and raw[:6] == b"\x93NUMPY"
    log = server.log()
    assert "Traceback" not in log and "ERROR" not in log, log[-3000:]
    rss = server.rss()
    print(f"\nhostile suite: server RSS {server.rss_start / 2**20:.1f} MiB after the warm-up, {rss / 2**20:.1f} MiB "
          f"after the suite (bound +{RSS_BOUND / 2**20:.0f} MiB)")
    assert rss - server.rss_start <= RSS_BOUND, (server.rss_start, rss)


# ----------------------------------------------------------------------- a measurement (not a test) --


def measure(max_body: int = 64_000_000, numbers: int = 4_000_000, rounds: int = 4) -> None:
    """``python tests/test_serve_hostile.py``: the README's numbers. A 160 MB ``Content-Length`` against the
    default limit; then, under ``--max-body``, a body of ``numbers`` cond values (a 422 after its parse) while a
    thread polls ``/healthz``: the body's time, ``/healthz``'s worst and median latency, the server's RSS."""
    import tempfile
    from pathlib import Path

    def start(*extra):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        log = open(Path(tempfile.mkdtemp()) / "server.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "vdeploy.cli", "serve", "--model", str(model), "--port",
                                 str(port), "--backend", "cpu", "--threads", "1", "--batching", "off", "--quiet",
                                 *extra], stdout=log, stderr=subprocess.STDOUT)
        server = Server(proc, port, Path(log.name))
        wait_for(lambda: _ready(server) or proc.poll() is not None, timeout=120, what="vdeploy serve")
        return server

    def rss(server):
        return f"{server.rss() / 2**20:.0f} MiB"

    model = model_dir("cond")
    server = start()
    began = time.perf_counter()
    sock = server.raw(_head(length=160_000_000))
    status, _ = _response(sock)
    print(f"default limit: a 160 MB Content-Length answered {status} in {(time.perf_counter() - began) * 1e3:.1f} ms; "
          f"server RSS {rss(server)}")
    sock.close()
    server.proc.terminate()
    server.proc.wait(30)

    server = start("--max-body", str(max_body))
    body = json.dumps({"cond": [0.123456789] * numbers}).encode()
    print(f"--max-body {max_body}: idle server RSS {rss(server)}; a body of {len(body) / 1e6:.0f} MB ({numbers} numbers)")
    for round_ in range(rounds):
        latencies, done = [], threading.Event()

        def poll():
            while not done.is_set():
                began = time.perf_counter()
                server.request("GET", "/healthz", headers={})
                latencies.append(time.perf_counter() - began)
                time.sleep(0.02)

        poller = threading.Thread(target=poll)
        poller.start()
        began = time.perf_counter()
        status, _, _ = server.post(body)
        took = time.perf_counter() - began
        done.set()
        poller.join()
        latencies.sort()
        print(f"  body {round_ + 1}: {status} after {took:.2f} s; /healthz meanwhile: {len(latencies)} calls, max "
              f"{latencies[-1] * 1e3:.0f} ms, median {latencies[len(latencies) // 2] * 1e3:.1f} ms; server RSS {rss(server)}")
    server.proc.terminate()
    server.proc.wait(30)


if __name__ == "__main__":
    measure()
