"""Real detectors as livestereo sources: Quantum Detectors Merlin (TCP, .mib), DECTRIS
SIMPLON streams (v2 CBOR, v1 JSON), and 4D files (.npy, HDF5, .mib).

One folder per detector: pure decoding (``merlin/mib.py``, ``dectris/cbor.py``,
``dectris/compression.py``: no sockets), the source (``source.py``), and a simulator
beside it (``sim.py``). ``files.py`` sniffs and reads 4D files. Every source follows
:class:`livestereo.protocol.source.Source` and hands out the same start / frames / end
messages as the livestereo stream.

:func:`open_source` opens one from a URL::

    merlin://HOST[:PORT][?control=6341&arm=1&hot=39,52;10,11&depth=12]
    dectris://HOST[:PORT][?channel=threshold_1]
    PATH (a .npy / HDF5 / .mib file; picked by content)
"""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

__all__ = ["open_source"]


def _flag(v: str) -> bool:
    return v.lower() in ("1", "true", "yes", "on")


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
        return DectrisSource(f"tcp://{host}:{port}", scan_shape=scan_shape, calibration=calibration,
                             frames_per_message=int(query.get("batch", frames_per_message)), **kw)
    raise ValueError(f"unknown source URL scheme {parts.scheme!r} in {url!r} (expected merlin://, dectris:// or a file path)")
