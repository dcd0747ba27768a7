"""The SIMPLON REST client (livestereo.detectors.dectris.rest) against a tiny fake DCU:
paths, verbs and JSON sent, arm -> series id, errors; DectrisSource arming through it and
the dectris:// URL options."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from livestereo.detectors import open_source
from livestereo.detectors.dectris.rest import DectrisRestError, SimplonClient
from livestereo.detectors.dectris.sim import DectrisSimulator
from livestereo.detectors.dectris.source import DectrisSource
from livestereo.protocol.messages import FramesMessage, StartMessage
from tests.source_helpers import collect, free_port

API = "/detector/api/1.8.0"
STREAM = "/stream/api/1.8.0"


class FakeDCU:
    """A SIMPLON REST server on 127.0.0.1 (port 0): answers from ``routes``
    {(method, path): (status, body) or callable(body_json) -> (status, body)}; body: a
    JSON-able object, bytes, or None (empty). Every request is kept in ``calls`` as
    (method, path, content_type, json_body_or_raw)."""

    def __init__(self):
        self.routes: dict = {}
        self.calls: list[tuple[str, str, str | None, object]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _serve(self):
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n) if n else b""
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = raw
                fake.calls.append((self.command, self.path, self.headers.get("Content-Type"), body))
                route = fake.routes.get((self.command, self.path))
                if route is None:
                    status, out = 404, b"Not Found"
                else:
                    status, out = route(body) if callable(route) else route
                if out is None:
                    data = b""
                elif isinstance(out, bytes):
                    data = out
                else:
                    data = json.dumps(out).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json" if out is not None and not isinstance(out, bytes) else "text/plain")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = _serve

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def client(self, **kw) -> SimplonClient:
        return SimplonClient("127.0.0.1", self.port, **kw)

    def put_calls(self):
        return [(p, b) for m, p, _, b in self.calls if m == "PUT"]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def dcu():
    d = FakeDCU()
    yield d
    d.close()


# ------------------------------------------------------------------------- client


def test_config_get_and_put_paths_and_json(dcu):
    dcu.routes[("GET", f"{API}/config/nimages")] = (200, {"value": 5, "value_type": "uint", "access_mode": "rw"})
    dcu.routes[("PUT", f"{API}/config/ntrigger")] = (200, ["ntrigger"])
    dcu.routes[("GET", f"{STREAM}/config/header_detail")] = (200, {"value": "basic"})
    dcu.routes[("GET", "/detector/api/version/")] = (200, {"value": "1.8.0", "value_type": "string"})
    c = dcu.client()
    assert c.detector_config("nimages") == 5
    assert c.set_detector_config("ntrigger", 4096) == ["ntrigger"]
    assert c.stream_config("header_detail") == "basic"
    assert c.version() == "1.8.0"
    method, path, ctype, body = dcu.calls[1]
    assert (method, path, body) == ("PUT", f"{API}/config/ntrigger", {"value": 4096})
    assert ctype == "application/json"
    assert dcu.calls[0][:2] == ("GET", f"{API}/config/nimages")


def test_enable_stream_and_image_count(dcu):
    for key in ("mode", "header_detail", "format"):
        dcu.routes[("PUT", f"{STREAM}/config/{key}")] = (200, None)  # empty answer (as LiberTEM-live's simulator)
    for key in ("nimages", "ntrigger", "trigger_mode"):
        dcu.routes[("PUT", f"{API}/config/{key}")] = (200, [key])
    dcu.routes[("GET", f"{API}/config/trigger_mode")] = (200, {"value": "exte"})
    c = dcu.client()
    c.enable_stream(header_detail="basic", stream_format="cbor")
    assert c.set_image_count(48) == "exte"
    assert dcu.put_calls() == [(f"{STREAM}/config/mode", {"value": "enabled"}), (f"{STREAM}/config/header_detail", {"value": "basic"}),
                               (f"{STREAM}/config/format", {"value": "cbor"}),
                               (f"{API}/config/nimages", {"value": 1}), (f"{API}/config/ntrigger", {"value": 48})]
    dcu.calls.clear()
    assert c.set_image_count(10, trigger_mode="ints") == "ints"
    assert dcu.put_calls() == [(f"{API}/config/trigger_mode", {"value": "ints"}), (f"{API}/config/ntrigger", {"value": 1}),
                               (f"{API}/config/nimages", {"value": 10})]
    with pytest.raises(ValueError, match="at least one image"):
        c.set_image_count(0)


def test_commands_and_status(dcu):
    dcu.routes[("PUT", f"{API}/command/arm")] = (200, {"sequence id": 42})
    for cmd in ("trigger", "disarm", "abort", "cancel"):
        dcu.routes[("PUT", f"{API}/command/{cmd}")] = (200, None)
    dcu.routes[("GET", f"{API}/status/state")] = (200, {"value": "ready", "value_type": "string"})
    dcu.routes[("GET", f"{STREAM}/status/state")] = (200, {"value": "acquire"})
    c = dcu.client()
    assert c.arm() == 42
    c.trigger()
    c.trigger(count_time_s=0.5)
    c.disarm()
    c.abort()
    c.cancel()
    assert c.detector_state() == "ready" and c.stream_state() == "acquire"
    assert dcu.put_calls() == [(f"{API}/command/arm", None), (f"{API}/command/trigger", None),
                               (f"{API}/command/trigger", {"value": 0.5}), (f"{API}/command/disarm", None),
                               (f"{API}/command/abort", None), (f"{API}/command/cancel", None)]
    with pytest.raises(ValueError, match="count_time_s"):
        c.trigger(count_time_s=-1)


def test_other_api_version_and_text_answers(dcu):
    dcu.routes[("PUT", "/detector/api/1.6.0/command/arm")] = (200, {"sequence id": "7"})
    dcu.routes[("PUT", "/detector/api/1.6.0/config/nimages")] = (200, b'["nimages"]')  # JSON, sent as text/html
    dcu.routes[("GET", "/detector/api/1.6.0/config/description")] = (200, b"not json")
    c = dcu.client(api_version="1.6.0")
    assert c.url("detector", "command", "arm") == f"http://127.0.0.1:{dcu.port}/detector/api/1.6.0/command/arm"
    assert c.arm() == 7
    assert c.set_detector_config("nimages", 1) == ["nimages"]
    assert c.detector_config("description") == "not json"
    assert SimplonClient("::1", 8080).base_url == "http://[::1]:8080"


def test_http_errors_name_url_status_and_body(dcu):
    dcu.routes[("PUT", f"{API}/config/nimages")] = (500, {"error": "Value 3 for parameter nimages does not match"})
    c = dcu.client()
    with pytest.raises(DectrisRestError) as e:
        c.set_detector_config("nimages", 3)
    msg = str(e.value)
    assert f"PUT http://127.0.0.1:{dcu.port}{API}/config/nimages" in msg and "HTTP 500" in msg and "does not match" in msg
    assert e.value.status == 500 and isinstance(e.value, OSError)
    with pytest.raises(DectrisRestError, match=r"GET .*/config/no_such_key: HTTP 404.*Not Found") as e:
        c.detector_config("no_such_key")
    assert e.value.status == 404


def test_connection_refused_and_timeout():
    port = free_port()
    with pytest.raises(DectrisRestError, match=f"PUT http://127.0.0.1:{port}{API}/command/arm: connection refused") as e:
        SimplonClient("127.0.0.1", port, timeout_s=2).arm()
    assert e.value.status is None
    silent = socket.socket()  # accepts connections (backlog) but never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)
    try:
        c = SimplonClient("127.0.0.1", silent.getsockname()[1], timeout_s=0.3)
        t0 = time.monotonic()
        with pytest.raises(DectrisRestError, match=r"GET .*/status/state: no answer within 0.3 s \(timeout\)"):
            c.detector_state()
        assert time.monotonic() - t0 < 5
    finally:
        silent.close()


# ------------------------------------------------------------------------- DectrisSource arming


DATA = np.random.default_rng(5).poisson(3, size=(2, 3, 16, 12)).astype(np.uint16)


@pytest.mark.parametrize("version", [1, 2])
def test_source_arms_after_connecting(dcu, version):
    sim = DectrisSimulator(DATA, version=version, wait_for_peer_s=0.0, scan_in_user_data=False)

    def arm(_body):  # a DCU starts the series when armed: only then does the simulator send
        sim.start()
        return 200, {"sequence id": 1}

    dcu.routes[("PUT", f"{STREAM}/config/mode")] = (200, None)
    dcu.routes[("GET", f"{API}/config/trigger_mode")] = (200, {"value": "exte"})
    dcu.routes[("PUT", f"{API}/config/nimages")] = (200, ["nimages"])
    dcu.routes[("PUT", f"{API}/config/ntrigger")] = (200, ["ntrigger"])
    dcu.routes[("PUT", f"{API}/command/arm")] = arm
    try:
        src = DectrisSource(sim.endpoint, scan_shape=(2, 3), rest=("127.0.0.1", dcu.port), arm=True, images="scan", frames_per_message=4)
        items = collect(src)
        src.close()
    finally:
        sim.stop()
    assert src.armed_series_id == 1 and src.counters["armed"] == 1 and "SIMPLON" in src.name
    assert [p for p, _ in dcu.put_calls()] == [f"{STREAM}/config/mode", f"{API}/config/nimages", f"{API}/config/ntrigger",
                                               f"{API}/command/arm"]
    assert dcu.put_calls()[2][1] == {"value": 6}
    assert not [i.error for i in items if i.error]
    start = items[0].message
    assert isinstance(start, StartMessage) and start.scan_shape == (2, 3)
    assert start.metadata["dectris_armed_series_id"] == 1
    got = np.concatenate([i.message.data for i in items if isinstance(i.message, FramesMessage)])
    assert np.array_equal(got, DATA.reshape(6, 16, 12))
    assert items[-1].message.reason == "complete"


def test_source_does_not_arm_without_a_connection(dcu):
    dcu.routes[("PUT", f"{STREAM}/config/mode")] = (200, None)
    dcu.routes[("PUT", f"{API}/command/arm")] = (200, {"sequence id": 1})
    with pytest.raises(ConnectionError, match="no connection to the stream within 0.3 s; not arming"):
        DectrisSource(f"tcp://127.0.0.1:{free_port()}", rest=dcu.client(), arm=True, connect_timeout_s=0.3)
    assert [p for p, _ in dcu.put_calls()] == [f"{STREAM}/config/mode"]


def test_source_without_rest_sends_nothing_and_checks_options():
    with pytest.raises(ValueError, match="need rest="):
        DectrisSource("tcp://127.0.0.1:1", arm=True)
    with pytest.raises(ValueError, match="images='scan' needs a scan shape"):
        DectrisSource("tcp://127.0.0.1:1", rest=("127.0.0.1", free_port()), images="scan")
    with pytest.raises(DectrisRestError, match="connection refused"):
        DectrisSource("tcp://127.0.0.1:1", rest=SimplonClient("127.0.0.1", free_port(), timeout_s=1), arm=True)
    src = DectrisSource("tcp://127.0.0.1:1")
    assert src.rest is None and src.armed_series_id is None and src.name == "DECTRIS stream tcp://127.0.0.1:1 (pull)"
    src.close()


# ------------------------------------------------------------------------- dectris:// URL


def test_url_options(dcu):
    dcu.routes[("PUT", f"{STREAM}/config/mode")] = (200, None)
    dcu.routes[("PUT", f"{STREAM}/config/header_detail")] = (200, None)
    dcu.routes[("PUT", f"{API}/command/trigger")] = (200, None)
    dcu.routes[("GET", f"{API}/config/trigger_mode")] = (200, {"value": "ints"})
    dcu.routes[("PUT", f"{API}/config/nimages")] = (200, ["nimages"])
    dcu.routes[("PUT", f"{API}/config/ntrigger")] = (200, ["ntrigger"])
    src = open_source(f"dectris://127.0.0.1:{free_port()}?rest={dcu.port}&trigger=1&images=12&header_detail=basic")
    try:
        assert src.rest.host == "127.0.0.1" and src.rest.port == dcu.port and src.counters["triggers"] == 1
    finally:
        src.close()
    assert dcu.put_calls() == [(f"{STREAM}/config/mode", {"value": "enabled"}), (f"{STREAM}/config/header_detail", {"value": "basic"}),
                               (f"{API}/config/ntrigger", {"value": 1}), (f"{API}/config/nimages", {"value": 12}),
                               (f"{API}/command/trigger", None)]
    dcu.calls.clear()
    dcu.routes[("PUT", "/stream/api/1.6.0/config/mode")] = (200, None)
    src = open_source(f"dectris://10.0.0.5:31001?rest=127.0.0.1:{dcu.port}&api=1.6.0")  # rest alone: enable the stream
    assert (src.rest.host, src.rest.port, src.rest.api_version) == ("127.0.0.1", dcu.port, "1.6.0")
    assert src.armed_series_id is None and dcu.put_calls() == [("/stream/api/1.6.0/config/mode", {"value": "enabled"})]
    src.close()
    with pytest.raises(ValueError, match="the options arm need rest=PORT"):
        open_source("dectris://10.0.0.5:31001?arm=1")
    with pytest.raises(ValueError, match="images='many'"):
        open_source("dectris://10.0.0.5:31001?rest=80&images=many")
    with pytest.raises(ValueError, match="rest='x'"):
        open_source("dectris://10.0.0.5:31001?rest=x")


def test_cli_reports_an_unreachable_dcu(tmp_path):
    port = free_port()
    out = subprocess.run([sys.executable, "-m", "livestereo", "run", "--no-inference", "--output-dir", str(tmp_path),
                          "--source", f"dectris://127.0.0.1:{free_port()}?rest={port}&arm=1"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"PUT http://127.0.0.1:{port}/stream/api/1.8.0/config/mode: connection refused" in out.stdout
