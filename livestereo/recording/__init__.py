"""Recording, replay (file side) and export of livestereo streams (pure: no sockets).

- ``format``: the append-only, checksummed recording file (writer, reader, summary);
- ``export``: recording -> HDF5 4D array for LiberTEM / py4DSTEM / HyperSpy.

The socket sides are ``livestereo.transport.record`` and ``livestereo.transport.replay``.
"""

from livestereo.recording.format import (
    Record,
    RecordingError,
    RecordingReader,
    RecordingSummary,
    RecordingWriter,
    scan_recording,
)

__all__ = [
    "Record", "RecordingError", "RecordingReader", "RecordingSummary", "RecordingWriter",
    "scan_recording", "export_hdf5", "ExportSummary",
]


def __getattr__(name: str):
    # export pulls in h5py; import it only when asked for
    if name in ("export_hdf5", "ExportSummary"):
        from livestereo.recording import export

        return getattr(export, name)
    raise AttributeError(f"module 'livestereo.recording' has no attribute {name!r}")
