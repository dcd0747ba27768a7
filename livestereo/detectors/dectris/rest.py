"""A small client for the DECTRIS SIMPLON REST API (no dependencies: urllib + json).

SIMPLON addresses every value as ``http://HOST:PORT/{subsystem}/api/{version}/{kind}/{key}``
(subsystem: detector, stream, filewriter, monitor, system; kind: config, status, command).
Values are JSON objects ``{"value": ...}`` both ways (reads also carry value_type,
access_mode, unit, allowed_values); a config write answers with the list of parameters it
changed, ``arm`` answers ``{"sequence id": N}``: the series id the stream's header and
images will carry.

What livestereo needs from it: enable the stream, set how many images a scan has, arm,
trigger, read the state. Everything else is reachable through :meth:`SimplonClient.get`
and :meth:`SimplonClient.put`.
"""

from __future__ import annotations

import http.client
import json
import math
import socket
import urllib.error
import urllib.request
from typing import Any

__all__ = ["DectrisRestError", "SimplonClient", "DEFAULT_API_VERSION", "DEFAULT_REST_PORT"]

DEFAULT_API_VERSION = "1.8.0"
DEFAULT_REST_PORT = 80
_NO_VALUE = object()


class DectrisRestError(OSError):
    """A SIMPLON request that failed: the URL, the HTTP status and body, or why no answer came
    (connection refused, timeout). An OSError, so callers that report unreachable devices
    (``livestereo run``) report it the same way."""

    def __init__(self, method: str, url: str, *, status: int | None = None, body: str = "", reason: str = ""):
        self.method = method
        self.url = url
        self.status = status
        self.body = body
        self.reason = reason
        if status is not None:
            text = f"HTTP {status}" + (f" {reason}" if reason else "")
            if body:
                text += f": {body.strip()[:300]}"
        else:
            text = reason or "no answer"
        super().__init__(f"DECTRIS SIMPLON {method} {url}: {text}")


class SimplonClient:
    """The SIMPLON API of one DCU.

    host, port: the DCU's REST server (port 80 on a real DCU). api_version: the path
    component of every URL ("1.8.0" for EIGER2 / ARINA / QUADRO firmware of the last years).
    timeout_s: seconds for connecting and for each answer (arming can take a second or two
    on a real detector).
    """

    def __init__(self, host: str, port: int = DEFAULT_REST_PORT, api_version: str = DEFAULT_API_VERSION, timeout_s: float = 10.0):
        self.host = host
        self.port = int(port)
        self.api_version = api_version
        self.timeout_s = float(timeout_s)
        h = f"[{host}]" if ":" in host and not host.startswith("[") else host
        self.base_url = f"http://{h}:{self.port}"

    def __repr__(self) -> str:
        return f"SimplonClient({self.base_url}, api {self.api_version})"

    # ------------------------------------------------------------------ HTTP

    def url(self, subsystem: str, kind: str, key: str = "") -> str:
        """``http://HOST:PORT/{subsystem}/api/{version}/{kind}/{key}``."""
        return f"{self.base_url}/{subsystem}/api/{self.api_version}/{kind}/{key}"

    def request(self, method: str, url: str, value: Any = _NO_VALUE) -> Any:
        """One request; the answer's JSON (None for an empty body, the text if it is not
        JSON). A PUT with a value sends ``{"value": value}``; without one, an empty body
        (commands). Raises DectrisRestError for HTTP errors, refused connections, timeouts."""
        data = None
        headers = {"Accept": "application/json"}
        if value is not _NO_VALUE:
            data = json.dumps({"value": value}).encode()
            headers["Content-Type"] = "application/json"
        elif method == "PUT":
            data = b""
        req = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                body = resp.read()
        except urllib.error.HTTPError as exc:
            try:
                text = exc.read().decode("utf-8", "replace")
            except Exception:
                text = ""
            raise DectrisRestError(method, url, status=exc.code, reason=str(exc.reason or ""), body=text) from None
        except urllib.error.URLError as exc:
            raise DectrisRestError(method, url, reason=self._why(exc.reason)) from None
        except (TimeoutError, socket.timeout) as exc:
            raise DectrisRestError(method, url, reason=self._why(exc)) from None
        except (OSError, http.client.HTTPException) as exc:
            raise DectrisRestError(method, url, reason=f"{type(exc).__name__}: {exc}") from None
        if not body.strip():
            return None
        text = body.decode("utf-8", "replace")
        try:
            return json.loads(text)
        except ValueError:
            return text

    def _why(self, reason) -> str:
        if isinstance(reason, (TimeoutError, socket.timeout)) or "timed out" in str(reason):
            return f"no answer within {self.timeout_s:g} s (timeout)"
        if isinstance(reason, ConnectionRefusedError):
            return f"connection refused (is the SIMPLON API at {self.host}:{self.port}?)"
        return f"{type(reason).__name__}: {reason}" if isinstance(reason, BaseException) else str(reason)

    def get(self, subsystem: str, kind: str, key: str) -> Any:
        """The ``value`` of a config or status key (the whole answer if it has none)."""
        url = self.url(subsystem, kind, key)
        ans = self.request("GET", url)
        if isinstance(ans, dict) and "value" in ans:
            return ans["value"]
        return ans

    def put(self, subsystem: str, kind: str, key: str, value: Any = _NO_VALUE) -> Any:
        """Write ``{"value": value}`` (or send a command without a value); the answer."""
        return self.request("PUT", self.url(subsystem, kind, key), value)

    # ------------------------------------------------------------------ config

    def version(self) -> str | None:
        """The API version the DCU speaks (``GET /detector/api/version/``)."""
        ans = self.request("GET", f"{self.base_url}/detector/api/version/")
        return ans.get("value") if isinstance(ans, dict) else ans

    def detector_config(self, key: str) -> Any:
        return self.get("detector", "config", key)

    def set_detector_config(self, key: str, value: Any) -> list:
        """Set a detector value; the parameters the DCU changed (others may follow one)."""
        return self._changed(self.put("detector", "config", key, value))

    def stream_config(self, key: str) -> Any:
        return self.get("stream", "config", key)

    def set_stream_config(self, key: str, value: Any) -> list:
        return self._changed(self.put("stream", "config", key, value))

    @staticmethod
    def _changed(ans) -> list:
        return list(ans) if isinstance(ans, list) else []

    def enable_stream(self, header_detail: str | None = None, stream_format: str | None = None) -> None:
        """Stream mode "enabled"; optionally header_detail ("all", "basic", "none") and the
        stream format (firmware with stream v2 names it here, e.g. "cbor")."""
        self.set_stream_config("mode", "enabled")
        if header_detail is not None:
            self.set_stream_config("header_detail", header_detail)
        if stream_format is not None:
            self.set_stream_config("format", stream_format)

    def set_image_count(self, n_images: int, trigger_mode: str | None = None) -> str:
        """Make one series ``n_images`` images long: one image per trigger
        (exte / inte: ntrigger = n, nimages = 1) or n images after one trigger
        (exts / ints: nimages = n, ntrigger = 1). trigger_mode: set it first; default:
        keep the detector's. Returns the trigger mode used."""
        n = int(n_images)
        if n < 1:
            raise ValueError(f"a series needs at least one image, not {n_images}")
        if trigger_mode is not None:
            self.set_detector_config("trigger_mode", trigger_mode)
            mode = trigger_mode
        else:
            mode = str(self.detector_config("trigger_mode"))
        if mode in ("exte", "inte"):
            self.set_detector_config("nimages", 1)
            self.set_detector_config("ntrigger", n)
        elif mode in ("exts", "ints"):
            self.set_detector_config("ntrigger", 1)
            self.set_detector_config("nimages", n)
        else:
            raise ValueError(f"{self.base_url}: unknown trigger mode {mode!r} (expected exte, inte, exts or ints)")
        return mode

    # ------------------------------------------------------------------ commands and status

    def command(self, name: str, value: Any = _NO_VALUE) -> Any:
        """A detector command (arm, trigger, disarm, abort, cancel, initialize, ...)."""
        return self.put("detector", "command", name, value)

    def arm(self) -> int | None:
        """Arm; the series id the stream will carry ("sequence id"), None if not said."""
        ans = self.command("arm")
        sid = ans.get("sequence id") if isinstance(ans, dict) else None
        try:
            return int(sid) if sid is not None else None
        except (TypeError, ValueError):
            return None

    def trigger(self, count_time_s: float | None = None) -> None:
        """One software trigger (ints: a whole series; inte: one image, exposed
        ``count_time_s`` seconds)."""
        if count_time_s is not None and not (math.isfinite(count_time_s) and count_time_s > 0):
            raise ValueError(f"count_time_s must be a positive number of seconds, not {count_time_s}")
        if count_time_s is None:
            self.command("trigger")
        else:
            self.command("trigger", float(count_time_s))

    def disarm(self) -> None:
        self.command("disarm")

    def abort(self) -> None:
        self.command("abort")

    def cancel(self) -> None:
        self.command("cancel")

    def detector_state(self) -> Any:
        """``detector/status/state``: na, idle, ready, acquire, configure, initialize, error."""
        return self.get("detector", "status", "state")

    def stream_state(self) -> Any:
        """``stream/status/state``: disabled, ready, acquire, error."""
        return self.get("stream", "status", "state")
