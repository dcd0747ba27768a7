"""livestereo stream v1: message objects and their msgpack wire form (pure: no sockets)."""

from livestereo.protocol.codec import ProtocolError, decode, encode
from livestereo.protocol.messages import (
    PROTOCOL_VERSION,
    Calibration,
    EndMessage,
    FramesMessage,
    Message,
    StartMessage,
)

__all__ = [
    "PROTOCOL_VERSION", "Calibration", "EndMessage", "FramesMessage", "Message", "ProtocolError",
    "StartMessage", "decode", "encode",
]
