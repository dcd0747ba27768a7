"""A DECTRIS detector (SIMPLON stream v2 CBOR or stream v1 JSON) as a livestereo source.

The DCU binds a PUSH socket (stream v2: port 31001; stream v1: port 9999); this source
connects a PULL socket to it. Each image arrives as its own message (bslz4/lz4
compressed); the source decompresses them straight into a batch and hands out frames
messages of up to ``frames_per_message`` frames (or whatever came within
``max_batch_wait_s``).

Several receivers on one DECTRIS stream: PUSH deals images round-robin to all connected
PULL sockets, so each livestereo receiver gets only a share of the frames. This source
reports the gaps ("frames_lost") and closes such a run as aborted; it never pretends it
saw every frame. Use one receiver per stream (or fan out from livestereo).

Arming (optional): given ``rest`` (a :class:`~livestereo.detectors.dectris.rest.SimplonClient`
or ``(host, port)``), the source enables the DCU's stream over the SIMPLON API, optionally
sets the series length (``images``), connects its PULL socket, waits until the connection
stands, then arms (``arm=True``) and sends one software trigger (``trigger=True``). It arms
once, when it opens; the series id the DCU gave is ``armed_series_id``. Without ``rest``
nothing is sent to the detector.
"""

from __future__ import annotations

import collections
import time

import numpy as np
import zmq

from livestereo.detectors.common import BatchPool, PixelMask, RunBuilder, bad, ok, sanitize_run_id
from livestereo.detectors.dectris import cbor
from livestereo.protocol.codec import ProtocolError
from livestereo.protocol.messages import Calibration
from livestereo.protocol.source import Received

DEFAULT_PORT_V2 = 31001
DEFAULT_PORT_V1 = 9999


class DectrisSource:
    """Frames from a DECTRIS stream as livestereo messages.

    endpoint: the DCU's stream endpoint, e.g. ``tcp://10.0.0.5:31001``.
    scan_shape: (ny, nx); default: ``user_data["scan_shape"]`` of the start message, else a
    single row of ``number_of_images``. channel: which stream v2 channel to use (default:
    the first of the start message's channels). use_pixel_mask: zero the pixels the
    detector flags in its pixel_mask.

    SIMPLON arming (all optional; nothing is sent without ``rest``): rest: a SimplonClient or
    ``(host, port)`` of the DCU's REST API. images: set the series length before arming, a
    number of images or ``"scan"`` (ny * nx of scan_shape); nimages / ntrigger follow the
    detector's trigger mode. header_detail / stream_format: stream config to set
    ("basic" / "all" / "none"; e.g. "cbor"). arm: arm once the PULL socket is connected
    (waits up to ``connect_timeout_s`` seconds for the connection). trigger: one software
    trigger after arming (ints / inte). Errors raise DectrisRestError (an OSError).
    """

    def __init__(self, endpoint: str = f"tcp://127.0.0.1:{DEFAULT_PORT_V2}", *, scan_shape: tuple[int, int] | None = None,
                 calibration: Calibration | None = None, frames_per_message: int = 64, channel: str | None = None,
                 use_pixel_mask: bool = True, max_batch_wait_s: float = 0.05, run_prefix: str = "dectris",
                 context: zmq.Context | None = None, rcvhwm: int = 100000, rest=None, arm: bool = False,
                 trigger: bool = False, images: int | str | None = None, header_detail: str | None = None,
                 stream_format: str | None = None, connect_timeout_s: float = 5.0):
        self.endpoint = endpoint
        self.name = f"DECTRIS stream {endpoint} (pull)"
        self.scan_shape = tuple(scan_shape) if scan_shape else None
        self.calibration = calibration
        self.frames_per_message = max(1, int(frames_per_message))
        self.channel = channel
        self.use_pixel_mask = use_pixel_mask
        self.max_batch_wait_s = max_batch_wait_s
        self.run_prefix = run_prefix
        self.counters: collections.Counter[str] = collections.Counter()
        self._ctx = context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.PULL)
        self._sock.setsockopt(zmq.RCVHWM, rcvhwm)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._pending: collections.deque[Received] = collections.deque()
        self._series: dict | None = None  # what the start message / v1 header said
        self._run: RunBuilder | None = None
        self._mask: PixelMask | None = None
        self._batch: np.ndarray | None = None
        self._batches = BatchPool()
        self._batch_n = 0
        self._batch_first = 0
        self._batch_t0 = 0.0
        self._batch_bytes = 0
        self._v1: dict = {}  # stream v1 state: expected next part
        self._closed = False
        self._run_count = 0
        self.rest = None
        self.armed_series_id: int | None = None
        if rest is None:
            if arm or trigger or images is not None or header_detail or stream_format:
                self._sock.close(linger=0)
                raise ValueError(f"{self.name}: arm / trigger / images / header_detail / stream_format need rest=(host, port) "
                                 "of the DCU's SIMPLON API")
            self._sock.connect(endpoint)
        else:
            try:
                self._prepare_detector(rest, arm=arm, trigger=trigger, images=images, header_detail=header_detail,
                                       stream_format=stream_format, connect_timeout_s=connect_timeout_s)
            except BaseException:
                self._sock.close(linger=0)
                raise

    # ------------------------------------------------------------------ SIMPLON

    def _prepare_detector(self, rest, *, arm: bool, trigger: bool, images, header_detail, stream_format,
                          connect_timeout_s: float) -> None:
        """Configure the DCU, connect, wait for the connection, arm, trigger (in that order:
        with the stream disabled the DCU has no socket to connect to)."""
        from livestereo.detectors.dectris.rest import SimplonClient

        if isinstance(rest, SimplonClient):
            client = rest
        elif isinstance(rest, (tuple, list)) and 1 <= len(rest) <= 2:
            client = SimplonClient(*rest)
        else:
            raise TypeError(f"rest must be a SimplonClient or (host, port), not {rest!r}")
        self.rest = client
        self.name = f"DECTRIS stream {self.endpoint} (pull, SIMPLON {client.base_url})"
        n_images = None
        if images is not None:
            if images == "scan":
                if not self.scan_shape:
                    raise ValueError(f"{self.name}: images='scan' needs a scan shape")
                n_images = int(self.scan_shape[0]) * int(self.scan_shape[1])
            else:
                n_images = int(images)
        client.enable_stream(header_detail=header_detail, stream_format=stream_format)
        if n_images is not None:
            client.set_image_count(n_images)
        monitor = self._sock.get_monitor_socket(zmq.EVENT_CONNECTED) if arm else None
        self._sock.connect(self.endpoint)
        if monitor is not None:
            try:
                connected = bool(monitor.poll(int(max(0.0, connect_timeout_s) * 1000), zmq.POLLIN))
            finally:
                self._sock.disable_monitor()
                monitor.close(linger=0)
            if not connected:
                raise ConnectionError(f"{self.name}: no connection to the stream within {connect_timeout_s:g} s; "
                                      "not arming (is the stream port right and the stream enabled?)")
            self.armed_series_id = client.arm()
            self.counters["armed"] += 1
        if trigger:
            client.trigger()
            self.counters["triggers"] += 1

    # ------------------------------------------------------------------ public

    def receive(self, timeout_s: float) -> Received | None:
        if self._pending:
            return self._pending.popleft()
        if self._closed:
            raise EOFError(f"{self.name}: closed")
        deadline = time.monotonic() + max(0.0, timeout_s)
        while True:
            now = time.monotonic()
            if self._batch_n and now - self._batch_t0 >= self.max_batch_wait_s:
                self._flush()
            if self._pending:
                return self._pending.popleft()
            wait = deadline - now
            if self._batch_n:
                wait = min(wait, self.max_batch_wait_s - (now - self._batch_t0))
            if wait <= 0 and not self._batch_n:
                return None
            if self._sock.poll(max(0, int(wait * 1000)), zmq.POLLIN):
                # drain what is there without waiting
                for _ in range(4 * self.frames_per_message):
                    try:
                        parts = self._sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self._handle([p.buffer for p in parts], sum(len(p) for p in parts))
                    if self._pending and not self._batch_n:
                        break
            elif time.monotonic() >= deadline:
                self._flush()
                return self._pending.popleft() if self._pending else None

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._sock.close(linger=0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ dispatch

    def _handle(self, parts, nbytes: int) -> None:
        self.counters["messages"] += 1
        self.counters["bytes"] += nbytes
        try:
            if len(parts) == 1 and cbor.looks_like_cbor(parts[0]):
                self._handle_v2(cbor.decode_v2(parts[0]), nbytes)
            else:
                self._handle_v1(parts)
        except ProtocolError as exc:
            self.counters["errors"] += 1
            self._pending.append(bad(exc.reason, f"{self.name}: {exc.detail}"))

    # ------------------------------------------------------------------ stream v2

    def _handle_v2(self, msg: dict, nbytes: int) -> None:
        kind = msg.get("type")
        if kind == "start":
            self._new_series(msg, version=2)
        elif kind == "image":
            self._image_v2(msg, nbytes)
        elif kind == "end":
            self._end_series(msg.get("series_id"))
        else:
            raise ProtocolError("unknown_type", f"stream v2 message of type {kind!r} ignored")

    def _new_series(self, info: dict, version: int) -> None:
        self._flush()
        run = self._run
        if run is not None and not run.ended:
            if not run.complete:
                self._pending.append(bad("restarted", f"{self.name}: series {info.get('series_id')} started after "
                                         f"{run.frames_sent} of {run.expected_frames} frames of run {run.run_id}: run aborted"))
            self._end_run()
        self._series = {"version": version, **info}
        self._run = None

    def _channel(self, data: dict) -> str:
        if self.channel is not None:
            if self.channel not in data:
                raise ProtocolError("bad_channel", f"image has no channel {self.channel!r} (it has {', '.join(map(str, data))})")
            return self.channel
        chans = (self._series or {}).get("channels") or list(data)
        for c in chans:
            if c in data:
                return c
        return next(iter(data))

    def _image_v2(self, msg: dict, nbytes: int) -> None:
        data = msg.get("data")
        if not isinstance(data, dict) or not data:
            raise ProtocolError("bad_message", f"image {msg.get('image_id')} has no data channels")
        ch = self._channel(data)
        arr = data[ch]
        if not isinstance(arr, cbor.EncodedArray) or len(arr.shape) != 2:
            raise ProtocolError("bad_message", f"image {msg.get('image_id')} channel {ch!r} is not a 2D typed array")
        image_id = msg.get("image_id")
        if not isinstance(image_id, int) or image_id < 0:
            raise ProtocolError("bad_message", f"image message has image_id {image_id!r}")
        series = self._series
        if series is not None and msg.get("series_id") != series.get("series_id"):
            raise ProtocolError("series_mismatch", f"image {image_id} of series {msg.get('series_id')} while series "
                                f"{series.get('series_id')} is open; image ignored")
        self._image(image_id, arr, nbytes, channel=ch, series_id=msg.get("series_id"))

    # ------------------------------------------------------------------ frames

    def _start_run(self, arr: cbor.EncodedArray, channel: str | None, series_id) -> None:
        s = self._series or {}
        if not s:
            self._pending.append(bad("no_start", f"{self.name}: image of series {series_id} without a start message "
                                     "(connected mid-series?); starting a run from the images"))
        n_images = s.get("number_of_images") or s.get("nimages")
        if s.get("version") == 1 and s.get("ntrigger") and s.get("nimages"):
            n_images = int(s["nimages"]) * int(s["ntrigger"])
        user = s.get("user_data") if isinstance(s.get("user_data"), dict) else {}
        scan = self.scan_shape or (tuple(user["scan_shape"]) if isinstance(user.get("scan_shape"), (list, tuple)) else None)
        guessed = False
        if scan is None:
            guessed = True
            scan = (1, int(n_images)) if n_images else (1, 1)
            self._pending.append(bad("no_scan_shape", f"{self.name}: no scan shape configured or in user_data; using {scan}"))
        n_pos = scan[0] * scan[1]
        # without a start message the series length is unknown: until stopped
        repeat = (max(1, int(n_images) // n_pos) if n_images else 1) if s else 0
        dtype = arr.dtype.newbyteorder("<")
        frame_shape = tuple(arr.shape)
        md = {"source": self.name, "dectris_stream_version": s.get("version")}
        for k in ("series_id", "series_unique_id", "detector_description", "detector_serial_number", "count_time",
                  "frame_time", "incident_energy", "incident_wavelength", "pixel_size_x", "pixel_size_y",
                  "sensor_material", "sensor_thickness", "saturation_value", "beam_center_x", "beam_center_y",
                  "number_of_images", "channels", "arm_date", "threshold_energy", "trigger_mode", "nimages", "ntrigger"):
            if k in s and isinstance(s[k], (int, float, str, list, dict)):
                md[f"dectris_{k}"] = s[k]
        if channel is not None:
            md["dectris_channel"] = channel
        if self.armed_series_id is not None:
            md["dectris_armed_series_id"] = self.armed_series_id
        if guessed:
            md["scan_shape_guessed"] = True
        masked = None
        pm = s.get("pixel_mask")
        if self.use_pixel_mask and pm is not None:
            if isinstance(pm, dict):
                pm = pm.get(channel) if channel in pm else (next(iter(pm.values())) if pm else None)
            if isinstance(pm, cbor.EncodedArray):
                try:
                    pm = pm.decode()
                except ProtocolError as exc:
                    self._pending.append(bad(exc.reason, f"{self.name}: pixel mask unreadable: {exc.detail}"))
                    pm = None
            if pm is not None:
                pm = np.asarray(pm)
                if pm.shape == frame_shape:
                    masked = pm != 0
                else:
                    self._pending.append(bad("bad_pixel_mask", f"{self.name}: pixel mask {pm.shape} does not match frames {frame_shape}"))
        self._mask = PixelMask(frame_shape, masked)
        if self._mask.count:
            md["masked_pixels"] = self._mask.count
        disc = None
        try:
            if "beam_center_x" in s and "beam_center_y" in s:
                disc = (float(s["beam_center_y"]), float(s["beam_center_x"]))
        except (TypeError, ValueError):
            disc = None
        uid = s.get("series_unique_id") or s.get("series_id") or series_id or time.strftime("%Y%m%dT%H%M%S")
        self._run_count += 1
        run_id = sanitize_run_id(f"{self.run_prefix}-{uid}-{self._run_count}")
        self._run = RunBuilder(run_id=run_id, scan_shape=scan, frame_shape=frame_shape, dtype=dtype.name,
                               calibration=self.calibration, metadata=md, repeat=repeat, disc_center_hint=disc)
        self._pending.append(ok(self._run.start))
        self._batch = self._batches.get((self.frames_per_message, *frame_shape), dtype)
        self._batch_n = 0

    def _image(self, index: int, arr: cbor.EncodedArray, nbytes: int, channel=None, series_id=None) -> None:
        if self._run is None or self._run.ended:
            self._start_run(arr, channel, series_id)
        run = self._run
        assert run is not None and self._batch is not None
        if tuple(arr.shape) != self._batch.shape[1:]:
            raise ProtocolError("bad_frame_shape", f"image {index} is {arr.shape}, the run's frames are {self._batch.shape[1:]}; image ignored")
        if self._batch_n and index != self._batch_first + self._batch_n:
            self._flush()
        if self._batch_n == 0:
            self._batch_first = index
            self._batch_t0 = time.monotonic()
            self._batch_bytes = 0
        slot = self._batch[self._batch_n]
        try:
            arr.decode_into(slot)
        except ProtocolError as exc:
            self._flush()
            raise ProtocolError(exc.reason, f"image {index}: {exc.detail}; image dropped") from None
        self._batch_n += 1
        self._batch_bytes += nbytes
        self.counters["frames"] += 1
        if self._batch_n == self.frames_per_message:
            self._flush()

    def _flush(self) -> None:
        n = self._batch_n
        if not n:
            return
        run = self._run
        assert run is not None and self._batch is not None and self._mask is not None
        data = self._batch[:n]
        self._batch = self._batches.get(self._batch.shape, self._batch.dtype)  # not one a message still holds
        self._batch_n = 0
        first = self._batch_first
        if first < run.next_index:
            self._pending.append(bad("frames_repeated", f"{self.name}: images {first}..{first + n - 1} came again; ignored"))
            return
        if first > run.next_index:
            self._pending.append(bad("frames_lost", f"{self.name}: images {run.next_index}..{first - 1} of run {run.run_id} "
                                     "never came (another receiver on the same stream takes a share of the images)"))
            self.counters["frames_lost"] += first - run.next_index
        exp = run.expected_frames
        if exp is not None and first + n > exp:
            self._pending.append(bad("extra_images", f"{self.name}: images {max(first, exp)}..{first + n - 1} are beyond "
                                     f"the {exp} images of run {run.run_id}; ignored"))
            data = data[: max(0, exp - first)]
            if data.shape[0] == 0:
                return
        self._mask.apply(data)
        per = self._batch_bytes // n
        for msg in run.frames(data, first):
            self._pending.append(ok(msg, nbytes=per * msg.count))
        if run.complete:
            self._end_run()

    def _end_series(self, series_id) -> None:
        self._flush()
        s = self._series
        if s is not None and series_id is not None and s.get("series_id") not in (None, series_id):
            self._pending.append(bad("series_mismatch", f"{self.name}: end of series {series_id} while series {s.get('series_id')} is open"))
        if self._run is not None and not self._run.ended:
            self._end_run()
        elif self._run is None and s is not None:
            self._pending.append(bad("empty_series", f"{self.name}: series {s.get('series_id')} ended without images"))
        self._series = None

    def _end_run(self) -> None:
        run = self._run
        if run is not None and not run.ended:
            self._flush()
            if not run.ended:
                self._pending.append(ok(run.end()))

    # ------------------------------------------------------------------ stream v1

    def _handle_v1(self, parts) -> None:
        """Stream v1: parts may come as one multipart message or one part per message."""
        queue = list(parts)
        while queue:
            part = queue.pop(0)
            want = self._v1.get("want")
            if want is not None:
                self._v1_continue(want, part)
                continue
            head = cbor.decode_json_part(part)
            htype = str(head.get("htype", ""))
            if htype.startswith("dheader-"):
                detail = head.get("header_detail", "none")
                self._v1 = {"series": head.get("series"), "detail": detail, "want": "config" if detail in ("basic", "all") else None}
                if detail not in ("basic", "all"):
                    self._new_series({"series_id": head.get("series")}, version=1)
            elif htype.startswith("dimage-") and not htype.startswith("dimage_d"):
                self._v1 = {"want": "image_d", "frame": head.get("frame"), "series": head.get("series")}
            elif htype.startswith("dseries_end"):
                self._v1 = {}
                self._end_series(head.get("series"))
            elif htype.startswith("dconfig"):
                continue  # trailing timing part of an image
            else:
                raise ProtocolError("unknown_type", f"stream v1 part with htype {htype!r} ignored")

    def _v1_continue(self, want: str, part) -> None:
        st = self._v1
        if want == "config":
            cfg = cbor.decode_json_part(part)
            info = {"series_id": st.get("series"), **cfg}
            self._new_series(info, version=1)
            st["want"] = "extra_header" if st.get("detail") == "all" else None
            st["extras"] = 0
        elif want == "extra_header":
            try:
                head = cbor.decode_json_part(part)
            except ProtocolError:
                st["want"] = None
                return
            htype = str(head.get("htype", ""))
            if htype.startswith(("dflatfield", "dpixelmask", "dcountrate")):
                st["extra"] = head
                st["want"] = "extra_blob"
            else:
                st["want"] = None
                self._handle_v1([part])
        elif want == "extra_blob":
            head = st.pop("extra")
            if str(head.get("htype", "")).startswith("dpixelmask") and self._series is not None:
                try:
                    self._series["pixel_mask"] = cbor.v1_array(head, part).decode()
                except ProtocolError as exc:
                    self._pending.append(bad(exc.reason, f"{self.name}: pixel mask: {exc.detail}"))
            st["extras"] = st.get("extras", 0) + 1
            st["want"] = "extra_header" if st["extras"] < 3 else None
        elif want == "image_d":
            st["image_d"] = cbor.decode_json_part(part)
            st["want"] = "image_blob"
        elif want == "image_blob":
            head = st.get("image_d", {})
            frame = st.get("frame")
            st["want"] = None
            series = self._series
            if series is not None and st.get("series") != series.get("series_id"):
                raise ProtocolError("series_mismatch", f"image {frame} of series {st.get('series')} while series "
                                    f"{series.get('series_id')} is open; image ignored")
            if not isinstance(frame, int) or frame < 0:
                raise ProtocolError("bad_message", f"stream v1 image with frame {frame!r}")
            arr = cbor.v1_array(head, part)
            self._image(frame, arr, len(part), channel=None, series_id=st.get("series"))
