"""Opening a source by name: files (livestereo recordings, 4D arrays, .mib) or detector URLs."""

from __future__ import annotations

from pathlib import Path

from livestereo.protocol.codec import ProtocolError, decode
from livestereo.protocol.messages import Calibration
from livestereo.protocol.source import Received, Source


class RecordingSource:
    """Replays a livestereo recording into the daemon directly (no socket), as fast as it goes."""

    def __init__(self, path: str | Path):
        from livestereo.recording.format import RecordingReader

        self.path = Path(path)
        self.name = f"recording {self.path}"
        self._reader = RecordingReader(self.path)
        self._it = iter(self._reader)

    def receive(self, timeout_s: float) -> Received | None:
        try:
            rec = next(self._it)
        except StopIteration:
            raise EOFError(f"{self.path}: {self._reader.stop_reason}") from None
        nbytes = sum(p.nbytes for p in rec.parts)
        try:
            return Received(decode(rec.parts), None, rec.parts, rec.recv_time, nbytes)
        except ProtocolError as exc:
            return Received(None, exc, rec.parts, rec.recv_time, nbytes)

    @property
    def stop_reason(self) -> str:
        return self._reader.stop_reason

    def close(self) -> None:
        self._reader.close()


def is_recording(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(5) == b"LSREC"
    except OSError:
        return False


def open_source_url(url: str, *, calibration: Calibration | None = None, scan_shape=None) -> Source:
    """A file path, ``merlin://HOST:PORT`` or ``dectris://HOST:PORT`` as a Source."""
    if "://" in url and not url.startswith("file://"):
        from livestereo.detectors import open_source

        return open_source(url, calibration=calibration, scan_shape=scan_shape)
    path = Path(url.removeprefix("file://"))
    if not path.exists():
        raise ValueError(f"{path}: no such file")
    if is_recording(path):
        return RecordingSource(path)
    from livestereo.detectors.files import open_file_source

    return open_file_source(path, calibration=calibration, scan_shape=scan_shape)


def drain(source: Source, handle, timeout_s: float = 0.0) -> None:
    """Feed every item of a finite source to ``handle`` until EOFError."""
    try:
        while True:
            item = source.receive(timeout_s)
            if item is not None:
                handle(item)
    except EOFError:
        return


