"""``vdeploy serve`` end to end: uvicorn on a free 127.0.0.1 port, real HTTP requests (stdlib http.client).

In-process servers (a uvicorn thread around ``Service(pipe=...)``) share the tests' pipeline, so the videos
can be compared with solo ``Pipeline`` calls on the same backend (tolerance as in test_serve_batcher). The
SIGTERM test runs ``vdeploy serve`` as a subprocess.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

pytest.importorskip("starlette", reason="the serving extra is not installed: pip install 'vdeploy[serve]'")
pytest.importorskip("uvicorn", reason="the serving extra is not installed: pip install 'vdeploy[serve]'")

import uvicorn  # noqa: E402

from runtime_fixtures import COND_DIM, model_dir  # noqa: E402
from serve_fixtures import assert_close, fused_model_dir, metric, request, wait_for  # noqa: E402,F401
from vdeploy.runtime import Pipeline  # noqa: E402
from vdeploy.runtime.serve.app import Service, create_app  # noqa: E402


@contextlib.contextmanager
def running(service: Service, ready=True):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(service), log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, what="uvicorn to start")
        if ready:
            wait_for(lambda: request(port, "GET", "/readyz")[0] == 200, what="/readyz")
        yield port
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture(scope="module")
def pipe(fused_model_dir):
    return Pipeline.from_dir(fused_model_dir, backend="cpu", threads=1)


@pytest.fixture(scope="module")
def port(pipe):
    with running(Service(pipe=pipe, max_batch=8, max_queue=8, batching=True)) as port:
        yield port


def test_health_ready_and_a_video_as_npy_gif_and_async(pipe, port):
    assert request(port, "GET", "/healthz")[:1] == (200,)
    status, _, body = request(port, "GET", "/readyz")
    assert status == 200 and json.loads(body)["backend"] == "onnxruntime-cpu"
    ask = {"prompt": "a red ball", "cond_scale": 2.0, "seed": 3, "steps": 4, "sampler": "ddim", "eta": 0.5}
    solo = pipe(text="a red ball", cond_scale=2.0, seed=3, steps=4, sampler="ddim", eta=0.5)
    results = {}

    def post(name, body):
        results[name] = request(port, "POST", "/v1/videos", body)

    threads = [threading.Thread(target=post, args=(name, {**ask, "format": name})) for name in ("npy", "gif")]
    threads += [threading.Thread(target=post, args=("other", {"seed": 1, "steps": 6, "format": "npy"}))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    status, headers, body = results["npy"]
    assert status == 200 and headers["content-type"] == "application/x-npy" and headers["x-steps"] == "4"
    import io

    assert_close(np.load(io.BytesIO(body)), solo, "npy")
    assert_close(np.load(io.BytesIO(results["other"][2])), pipe(seed=1, steps=6), "other")
    status, headers, body = results["gif"]
    assert status == 200 and headers["content-type"] == "image/gif" and body[:6] == b"GIF89a"

    status, headers, body = request(port, "POST", "/v1/videos", {**ask, "format": "npy", "async": True})
    assert status == 202
    job = json.loads(body)
    assert headers["location"] == f"/v1/videos/{job['id']}" and job["steps"] == 4
    wait_for(lambda: request(port, "GET", headers["location"])[1]["content-type"] == "application/x-npy",
             what="the async job")
    assert_close(np.load(io.BytesIO(request(port, "GET", headers["location"])[2])), solo, "async")
    assert request(port, "GET", "/v1/videos/nope")[0] == 404
    assert request(port, "DELETE", "/v1/videos/nope")[0] == 404
    assert metric(port, 'vdeploy_requests_total{status="ok"}') >= 3
    assert metric(port, "vdeploy_batch_rows_count") > 0 and metric(port, "vdeploy_queue_depth") == 0


def test_known_frames_condition_the_video_as_in_the_pipeline(pipe, port):
    import io

    frames = np.random.default_rng(0).uniform(0, 1, (3, 2, 8, 8)).astype(np.float32)
    ask = {"frames": frames.tolist(), "steps": 4, "seed": 5, "format": "npy", "sampler": "ddim"}
    status, _, raw = request(port, "POST", "/v1/videos", ask)
    assert status == 200, raw[:300]
    video = np.load(io.BytesIO(raw))
    assert_close(video, pipe(frames=frames, steps=4, seed=5, sampler="ddim"), "frames")
    np.testing.assert_allclose(video[0, :, :2], frames, atol=1e-6)  # the known frames come back as given
    status, _, raw = request(port, "POST", "/v1/videos", {"frames": frames[:, :, :4, :4].tolist(), "steps": 2})
    answer = json.loads(raw)
    assert status == 422 and answer["field"] == "frames" and "this model samples 3 channels of 8x8" in answer["error"]


BAD = [
    ({"sampler": "euler"}, "sampler", "'euler' is not one of 'dpmpp', 'dpmpp3m', 'unipc', 'ddim', 'ddpm'"),
    ({"steps": 0}, "steps", "0 is not in the range 1<=x<=50"),
    ({"steps": "4"}, "steps", "'4' is not a valid integer"),
    ({"seed": -1}, "seed", "-1 is not in the range"),
    ({"cond_scale": "nan"}, "cond_scale", "is not a valid float"),
    ({"sampler": "dpmpp", "eta": 0.5}, "eta", "sampler 'dpmpp' takes no option eta (its options: spacing, order)"),
    ({"spacing": "karras"}, "spacing", "'karras' is not one of 'trailing', 'leading', 'linspace', 'logsnr'"),
    ({"format": "webm"}, "format", "'webm' is not one of 'gif', 'mp4', 'npy'"),
    ({"prompt": "a", "cond": [0.0] * COND_DIM}, "cond", "pass either prompt or cond, not both"),
    ({"cond": [1.0, 2.0]}, "cond", f"has shape (1, 2): expected {COND_DIM} numbers"),
    ({"cond": [float("nan")] * COND_DIM}, "cond", "holds NaN or Inf"),
    ({"prompt": ""}, "prompt", "a prompt is empty"),
    ({"prompt": 3}, "prompt", "expected a string or a non-empty list of strings"),
    ({"batch_size": 2, "prompt": ["a", "b", "c"]}, "batch_size", "2 does not match the 3 rows of prompt/cond"),
    ({"batch_size": 99}, "batch_size", "99 is not in the range 1<=x<=16"),
    ({"async": "yes"}, "async", "'yes' is not a valid boolean"),
    ({"frames": [[["a"]]]}, "frames", "expected a nested list of numbers in [0, 1]"),
    ({"frames": [[[[0.5] * 8] * 8] * 2] * 3, "known_mask": [1, 0]}, "known_mask", "expected a list of booleans"),
    ({"resample": -1}, "resample", "-1 is not in the range 0<=x<=100"),
    ({"stpes": 4}, "stpes", "unknown field stpes (the fields are: prompt, cond, sampler"),
    ([1, 2], None, "the body must be a JSON object"),
]


@pytest.mark.parametrize("body, field, message", BAD, ids=[str(b)[:40] for b, _, _ in BAD])
def test_bad_input_is_422_naming_the_field(port, body, field, message):
    status, headers, raw = request(port, "POST", "/v1/videos", body)
    answer = json.loads(raw)
    assert status == 422 and headers["content-type"] == "application/json", raw
    assert answer["field"] == field and message in answer["error"], answer


def test_not_json_and_the_cli_wording(port, pipe, tmp_path):
    status, _, raw = request(port, "POST", "/v1/videos", b"{not json")
    assert status == 422 and json.loads(raw)["error"].startswith("the body is not valid JSON")
    from click.testing import CliRunner

    from vdeploy.cli import main

    result = CliRunner().invoke(main, ["sample", "--model", str(pipe.model_dir), "--out", str(tmp_path / "a.gif"),
                                       "--sampler", "dpmpp", "--eta", "0.5", "--backend", "cpu", "--quiet"])
    answer = json.loads(request(port, "POST", "/v1/videos", {"sampler": "dpmpp", "eta": 0.5})[2])
    assert result.exit_code == 2 and result.output.strip() == f"Error: {answer['error']}"


def test_a_flood_gets_429_with_retry_after(pipe):
    with running(Service(pipe=pipe, max_batch=1, max_queue=1, batching=True)) as port:
        results = []
        body = {"sampler": "ddpm", "steps": 50, "batch_size": 4, "format": "npy", "seed": 0}
        threads = [threading.Thread(target=lambda: results.append(request(port, "POST", "/v1/videos", body)))
                   for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        statuses = sorted(r[0] for r in results)
        assert len(results) == 6 and set(statuses) == {200, 429} and statuses.count(200) >= 2, statuses
        for status, headers, raw in results:
            if status == 429:
                assert int(headers["retry-after"]) >= 1 and "queue is full" in json.loads(raw)["error"]
        assert metric(port, 'vdeploy_requests_total{status="rejected"}') == statuses.count(429)


def test_a_client_that_disconnects_frees_its_slot(pipe):
    with running(Service(pipe=pipe, max_batch=1, max_queue=4, batching=True)) as port:
        body = json.dumps({"sampler": "ddpm", "steps": 50, "batch_size": 8, "seed": 0}).encode()
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(b"POST /v1/videos HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        wait_for(lambda: metric(port, "vdeploy_active_requests") == 1, what="the request to start")
        sock.close()
        wait_for(lambda: metric(port, "vdeploy_active_requests") == 0, what="the slot to be freed")
        assert metric(port, 'vdeploy_requests_total{status="disconnected"}') == 1
        assert metric(port, "vdeploy_step_seconds_count") < 50, "the abandoned request ran to its end"
        assert request(port, "POST", "/v1/videos", {"steps": 2})[0] == 200  # the slot serves the next one


def test_timeout_is_504_and_a_model_that_fails_to_load_is_not_ready(pipe, tmp_path):
    with running(Service(pipe=pipe, max_batch=1, timeout=0.05)) as port:
        status, _, raw = request(port, "POST", "/v1/videos", {"sampler": "ddpm", "steps": 50, "batch_size": 8})
        assert status == 504 and "timed out" in json.loads(raw)["error"], raw
    with running(Service(tmp_path / "missing", backend="cpu"), ready=False) as port:
        wait_for(lambda: b"failed to load" in request(port, "GET", "/readyz")[2], what="the load to fail")
        assert request(port, "GET", "/readyz")[0] == 503 and request(port, "GET", "/healthz")[0] == 200
        status, _, raw = request(port, "POST", "/v1/videos", {"steps": 2})
        assert status == 503 and "failed to load" in json.loads(raw)["error"]


def test_sigterm_finishes_or_cleanly_refuses_in_flight_work_and_exits_0(tmp_path):
    model = model_dir("uncond")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "vdeploy.cli", "serve", "--model", str(model), "--port", str(port), "--backend", "cpu",
         "--threads", "1", "--grace", "1", "--max-batch", "64", "--batching"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for(lambda: _ready(port) or proc.poll() is not None, timeout=60, what="vdeploy serve to be ready")
        assert proc.poll() is None, proc.stdout.read().decode()
        results = {}
        long_body = {"sampler": "ddpm", "steps": 50, "batch_size": 16, "format": "npy"}
        slow = threading.Thread(target=lambda: results.update(long=request(port, "POST", "/v1/videos", long_body)))
        slow.start()
        wait_for(lambda: metric(port, "vdeploy_step_seconds_count") >= 1, what="the long request to start")
        quick = threading.Thread(target=lambda: results.update(quick=request(port, "POST", "/v1/videos", {"steps": 2})))
        quick.start()
        wait_for(lambda: metric(port, "vdeploy_active_requests") == 2, what="both requests in the batch")
        proc.send_signal(signal.SIGTERM)
        slow.join(60)
        quick.join(60)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    log = proc.stdout.read().decode()
    assert "shutting down: draining" in log, log
    assert results["quick"][0] == 200, results["quick"]
    status, headers, raw = results["long"]
    if status == 503:  # still running when the 1 s grace ran out: refused cleanly
        assert json.loads(raw)["error"] == "the server shut down before this request finished"
        assert headers["retry-after"] == "5"
    else:
        assert status == 200 and np.load(__import__("io").BytesIO(raw)).shape == (16, 3, 4, 8, 8)
    assert "Traceback" not in log, log


def _ready(port) -> bool:
    try:
        return request(port, "GET", "/readyz", timeout=2)[0] == 200
    except OSError:
        return False


def test_mp4_without_an_encoder_is_422_and_the_cli_refuses_bad_settings(pipe, tmp_path):
    from click.testing import CliRunner

    from vdeploy.cli import main
    from vdeploy.runtime.serve.requests import Invalid, parse

    with pytest.raises(Invalid, match="mp4 needs PyAV on the server") as e:
        parse({"format": "mp4"}, pipe, can_mp4=False)
    assert e.value.field == "format"
    assert parse({"format": "mp4"}, pipe, can_mp4=True).format == "mp4"
    result = CliRunner().invoke(main, ["serve", "--model", str(tmp_path / "missing"), "--backend", "cpu"])
    assert result.exit_code == 2 and result.output.startswith("Error: ") and len(result.output.splitlines()) == 1
    result = CliRunner().invoke(main, ["serve", "--model", str(pipe.model_dir), "--replicas", "2"])
    assert result.exit_code == 2 and "--replicas needs --ray" in result.output


def test_a_server_fault_is_500_with_the_request_id_logged_once_and_the_loop_stays_free(pipe, caplog):
    service = Service(pipe=pipe, max_batch=1)
    with running(service) as port:
        release, entered = threading.Event(), threading.Event()

        def blocked(raw):  # the JSON is read and checked on a worker thread: the event loop keeps answering
            entered.set()
            release.wait(30)
            raise RuntimeError("a bug on the server")

        service.submit_body = blocked
        results = []
        poster = threading.Thread(target=lambda: results.append(request(port, "POST", "/v1/videos", {"steps": 2})))
        poster.start()
        assert entered.wait(30)
        status, headers, _ = request(port, "GET", "/healthz", timeout=10)
        assert status == 200 and headers["x-request-id"]
        release.set()
        poster.join(30)
    status, headers, raw = results[0]
    answer = json.loads(raw)
    rid = headers["x-request-id"]
    assert status == 500 and answer["request_id"] == rid and rid in answer["error"], answer
    assert "Traceback" not in raw.decode() and "a bug on the server" not in raw.decode()
    faults = [r for r in caplog.records if rid in r.getMessage()]
    assert len(faults) == 1 and faults[0].exc_info and "failed on the server" in faults[0].getMessage()


def test_the_body_limits_key_and_depth_scan():
    from vdeploy.runtime.serve import auth, limits

    # the default body limit: max_videos x (frames (c, f, h, w) + known_mask f + cond) numbers at 32 bytes,
    # prompts at 12 bytes a character, 64 KiB for the rest
    assert limits.default_max_body((3, 4, 8, 8), 6, 2, 2000) == 2 * (768 + 4 + 6) * 32 + 2 * 2000 * 12 + 65536
    assert limits.default_max_body((3, 4, 8, 8), None, 1, 2000) == (768 + 4) * 32 + 65536  # no prompts, no cond
    assert limits.nesting(b'{"frames": [[[[[0.5]]]]], "prompt": "[[[[[[[[\\"]]"}') == 6
    assert limits.nesting(b"[" * 100_000) > 6 and limits.nesting(b"[]" * 10) == 1 and limits.nesting(b"") == 0
    assert limits.nesting(b'["\\\\", [[[["\\"[[["]]]]]') == 5  # escaped backslash, then an escaped quote
    with pytest.raises(limits.BodyError, match="at most 6"):
        limits.load_json(b'{"a": ' + b"[" * 7 + b"]" * 7 + b"}")
    assert limits.load_json('{"prompt": "é [[[[[[[[[["}'.encode()) == {"prompt": "é [[[[[[[[[["}
    with pytest.raises(limits.BodyError, match="not UTF-8"):
        limits.load_json('{"prompt": "é"}'.encode("latin-1"))
    with pytest.raises(ValueError, match="is empty"):
        auth.read_key(None, {"VDEPLOY_API_KEY": " \n"})
    with pytest.raises(ValueError, match="cannot carry"):
        auth.read_key(None, {"VDEPLOY_API_KEY": "a key"})
    assert auth.read_key(None, {"VDEPLOY_API_KEY": "s3cret\n"}) == "s3cret" and auth.read_key(None, {}) is None
    key = auth.ApiKey("s3cret", metrics_open=True)
    assert key.refusal("/metrics", None) is None and key.refusal("/readyz", "Bearer s3cret") is None
    assert key.refusal("/readyz", "Bearer s3cre") == "the API key is wrong"


def test_the_cli_refuses_a_bad_api_key_file(pipe, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from vdeploy.cli import main

    monkeypatch.delenv("VDEPLOY_API_KEY", raising=False)
    (tmp_path / "empty").write_text("\n")
    for args, message in ((["--api-key-file", str(tmp_path / "missing")], "cannot read the API key file"),
                          (["--api-key-file", str(tmp_path / "empty")], "is empty"),
                          (["--metrics-open"], "--metrics-open needs an API key")):
        result = CliRunner().invoke(main, ["serve", "--model", str(pipe.model_dir), *args])
        assert result.exit_code == 2 and result.output.startswith("Error: ") and message in result.output, result.output
        assert len(result.output.splitlines()) == 1
