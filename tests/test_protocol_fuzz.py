"""Fuzzed streams: mutated, reordered and duplicated messages never make the decoder or the
ingest raise anything but ProtocolError (which the ingest counts and logs)."""

from __future__ import annotations

import logging
import random
import time

import msgpack
import numpy as np

from livestereo.daemon.ingest import Ingest
from livestereo.protocol.codec import ProtocolError, decode, encode
from livestereo.protocol.messages import EndMessage
from livestereo.protocol.source import Received
from tests.conftest import frames_parts, make_start, random_frames

#: values a mutated header field takes: wrong types, out-of-range and non-finite numbers
WEIRD = [None, True, 0, -1, 1, 2**31, 2**63 - 1, -(2**63), 1.5, float("nan"), float("inf"), "", "x" * 300,
         "uint16", "float32", [], [0], [1, 1], [-1, 5], [2**31, 2**31], [1, 2, 3], {}, {"a": 1}, b"\x00" * 5,
         "complete", "start", "frames", "end"]


def _mutate_header(part: bytes, rng: random.Random) -> bytes:
    header = msgpack.unpackb(part, raw=False)
    key = rng.choice([*header, "extra"])
    if rng.random() < 0.25 and key in header:
        del header[key]
    elif isinstance(header.get(key), dict) and header[key]:
        inner = header[key]
        inner[rng.choice(list(inner))] = rng.choice(WEIRD)
    else:
        header[key] = rng.choice(WEIRD)
    return msgpack.packb(header, use_bin_type=True)


def _mutate(parts: list[bytes], rng: random.Random) -> list[bytes]:
    parts = list(parts)
    r = rng.random()
    if r < 0.5:
        parts[0] = _mutate_header(parts[0], rng)
    elif r < 0.6:
        b = bytearray(parts[0])
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        parts[0] = bytes(b)
    elif r < 0.7:
        parts[0] = parts[0][: rng.randrange(len(parts[0]) + 1)]
    elif r < 0.8 and len(parts) > 1:
        parts[1] = parts[1][: rng.randrange(len(parts[1]) + 1)]
    elif r < 0.9:
        parts = [*parts, b"junk"] if rng.random() < 0.5 else parts[:1]
    else:
        parts = [bytes(rng.randrange(256) for _ in range(rng.randint(0, 30))), *parts[1:]]
    return parts


def test_fuzzed_streams_are_rejected_by_name_never_raised(caplog):
    caplog.set_level(logging.CRITICAL)
    start = make_start(scan_shape=(4, 4), repeat=2)
    frames = random_frames(16)
    clean = [[bytes(p) for p in encode(start)]]
    seq = 0
    for scan in range(2):
        for first in range(0, 16, 4):
            clean.append(frames_parts("r1", seq, scan, first, frames[first:first + 4]))
            seq += 1
    clean.append([bytes(p) for p in encode(EndMessage("r1", 32, "complete"))])
    rng = random.Random(1234)
    handled = rejected = 0
    for _ in range(300):
        ingest = Ingest(disc_frames=4)
        stream = [_mutate(m, rng) if rng.random() < 0.3 else list(m) for m in clean]
        if rng.random() < 0.3:
            i, j = rng.randrange(len(stream)), rng.randrange(len(stream))
            stream[i], stream[j] = stream[j], stream[i]
        if rng.random() < 0.2:
            stream.insert(rng.randrange(len(stream)), list(rng.choice(stream)))
        for parts in stream:
            try:
                item = Received(decode(parts), None, parts, time.time(), sum(map(len, parts)))
            except ProtocolError as exc:
                item = Received(None, exc, parts, time.time(), 0)
            ingest.handle(item)  # must not raise
            handled += 1
        ingest.flush()
        rejected += ingest.counters.rejected_total
    assert handled > 3000 and rejected > 300
    # the unmutated stream still gives both scans, every position filled
    scans = []
    ingest = Ingest(disc_frames=4, on_scan=scans.append)
    for parts in clean:
        ingest.handle(Received(decode(parts), None, parts, time.time(), 0))
    assert len(scans) == 2 and all(np.asarray(s.valid).all() for s in scans)
