"""Real detectors as livestereo sources: Quantum Detectors Merlin (TCP, .mib), DECTRIS
SIMPLON streams (v2 CBOR, v1 JSON), and 4D files (.npy, HDF5, .mib).

One folder per detector: pure decoding (``merlin/mib.py``, ``dectris/cbor.py``,
``dectris/compression.py``: no sockets), the source (``source.py``), and a simulator
beside it (``sim.py``). ``files.py`` sniffs and reads 4D files. Every source follows
:class:`livestereo.protocol.source.Source` and hands out the same start / frames / end
messages as the livestereo stream.

:func:`open_source` opens one from a URL::

    merlin://HOST[:PORT][?control=6341&arm=1&hot=39,52;10,11&depth=12&batch=64&threaded=1&busy_poll_us=1000]
    dectris://HOST[:PORT][?channel=threshold_1&rest=80&arm=1&trigger=1&images=scan]
    PATH (a .npy / HDF5 / .mib file; picked by content)

DECTRIS options for the SIMPLON REST API (nothing is sent to the DCU without ``rest``):
``rest=PORT`` or ``rest=HOST:PORT`` (the API; host default: the stream's), ``api=1.8.0``,
``arm=1`` (arm once connected), ``trigger=1`` (one software trigger after arming),
``images=scan`` or ``images=N`` (series length: the scan shape's ny * nx, or N),
``header_detail=basic|all|none``, ``format=...`` (stream format, e.g. cbor).
"""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

__all__ = ["open_source"]


def _flag(v: str) -> bool:
    return v.lower() in ("1", "true", "yes", "on")


def _simplon_options(query: dict[str, str], host: str, url: str) -> dict:
    """DectrisSource arguments for the SIMPLON REST options of a dectris:// URL."""
    kw: dict = {}
    wants = [k for k in ("arm", "trigger") if _flag(query.get(k, "0"))]
    wants += [k for k in ("images", "header_detail", "format", "api") if k in query]
    if "rest" not in query:
        if wants:
            raise ValueError(f"{url}: the options {', '.join(wants)} need rest=PORT (or rest=HOST:PORT), the DCU's SIMPLON API")
        return kw
    from livestereo.detectors.dectris.rest import DEFAULT_API_VERSION, SimplonClient

    rest = query["rest"]
    rhost, _, rport = rest.rpartition(":") if ":" in rest else ("", "", rest)
    try:
        port = int(rport)
    except ValueError:
        raise ValueError(f"{url}: rest={rest!r} is not PORT or HOST:PORT") from None
    kw["rest"] = SimplonClient(rhost.strip("[]") or host, port, api_version=query.get("api", DEFAULT_API_VERSION))
    kw["arm"] = _flag(query.get("arm", "0"))
    kw["trigger"] = _flag(query.get("trigger", "0"))
    if "images" in query:
        images = query["images"]
        if images != "scan":
            try:
                images = int(images)
            except ValueError:
                raise ValueError(f"{url}: images={images!r} is neither 'scan' nor a number of images") from None
        kw["images"] = images
    if "header_detail" in query:
        kw["header_detail"] = query["header_detail"]
    if "format" in query:
        kw["stream_format"] = query["format"]
    return kw


def open_source(url: str, *, calibration=None, scan_shape=None, frames_per_message: int = 64, **cfg):
    """A Source for ``url`` (see the module docstring). ``cfg`` goes to the source's
    constructor (e.g. ``hot_pixels``, ``mask``, ``control_port``, ``channel``)."""
    if "://" not in url or url.startswith("file://"):
        from livestereo.detectors.files import open_file_source

        return open_file_source(url.removeprefix("file://"), calibration=calibration, scan_shape=scan_shape,
                                frames_per_message=frames_per_message, **cfg)
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = parts.hostname or "127.0.0.1"
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    if scheme == "merlin":
        from livestereo.detectors.merlin.source import MerlinSource

        kw = dict(cfg)
        if "control" in query:
            kw.setdefault("control_port", int(query["control"]))
        if "arm" in query:
            kw.setdefault("arm", _flag(query["arm"]))
        if "depth" in query:
            kw.setdefault("depth", int(query["depth"]))
        if "threaded" in query:
            kw.setdefault("threaded", _flag(query["threaded"]))
        if "busy_poll_us" in query:
            try:
                kw.setdefault("busy_poll_s", float(query["busy_poll_us"]) * 1e-6)
            except ValueError:
                raise ValueError(f"{url}: busy_poll_us={query['busy_poll_us']!r} is not a number of microseconds") from None
        if "hot" in query:
            kw.setdefault("hot_pixels", [tuple(int(x) for x in p.split(",")) for p in query["hot"].split(";") if p])
        return MerlinSource(host, parts.port or 6342, scan_shape=scan_shape, calibration=calibration,
                            frames_per_message=int(query.get("batch", frames_per_message)), **kw)
    if scheme in ("dectris", "dectris1", "dectris2"):
        from livestereo.detectors.dectris.source import DEFAULT_PORT_V1, DEFAULT_PORT_V2, DectrisSource

        port = parts.port or (DEFAULT_PORT_V1 if scheme == "dectris1" else DEFAULT_PORT_V2)
        kw = dict(cfg)
        if "channel" in query:
            kw.setdefault("channel", query["channel"])
        for k, v in _simplon_options(query, host, url).items():
            kw.setdefault(k, v)
        return DectrisSource(f"tcp://{host}:{port}", scan_shape=scan_shape, calibration=calibration,
                             frames_per_message=int(query.get("batch", frames_per_message)), **kw)
    raise ValueError(f"unknown source URL scheme {parts.scheme!r} in {url!r} (expected merlin://, dectris:// or a file path)")
