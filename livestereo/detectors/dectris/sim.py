"""A DECTRIS simulator: a PUSH socket serving a 4D array as a SIMPLON stream v2 (CBOR,
bslz4 / lz4 / raw) or stream v1 (JSON multipart, bs16-lz4< ...) series.

    with DectrisSimulator(data, endpoint="tcp://127.0.0.1:*") as sim:
        src = DectrisSource(sim.endpoint, scan_shape=data.shape[:2])

Images are compressed once up front (a scan is cycled for ``repeat`` > 1), so the send
rate is the socket's, not the compressor's.

``python -m livestereo.detectors.dectris.sim FILE.npy --port 31001`` serves a file.
"""

from __future__ import annotations

import argparse
import threading
import time

import numpy as np
import zmq

from livestereo.detectors.dectris import cbor


class DectrisSimulator:
    """Serve ``data`` ((ny, nx, h, w) or (n, h, w) unsigned ints) on a PUSH socket.

    endpoint: where to bind (``tcp://127.0.0.1:*`` picks a free port; the bound address is
    ``.endpoint``). version: 2 (CBOR) or 1 (JSON). compression: 'bslz4', 'lz4' or None
    (stream v1: the encoding, e.g. 'bs16-lz4<'). channels: stream v2 channel names (every
    channel carries the same frames). pixel_mask: (h, w) array sent in the start message.
    beam_center: (x, y) in px. series: how many series to send one after another.
    scan_in_user_data: put ``scan_shape`` in the start message's user_data.
    """

    def __init__(self, data: np.ndarray, *, endpoint: str = "tcp://127.0.0.1:*", version: int = 2,
                 compression: str | None = "bslz4", channels: tuple[str, ...] = ("threshold_1",),
                 pixel_mask: np.ndarray | None = None, beam_center: tuple[float, float] | None = None,
                 repeat: int = 1, series: int = 1, series_id: int = 1, scan_in_user_data: bool = True,
                 wait_for_peer_s: float = 0.3, context: zmq.Context | None = None, sndhwm: int = 100000):
        arr = np.asarray(data)
        self.scan_shape = tuple(arr.shape[:2]) if arr.ndim == 4 else None
        frames = arr.reshape(-1, *arr.shape[-2:])
        if frames.dtype.kind not in "ui":
            raise ValueError(f"DECTRIS detectors send unsigned integers, not {frames.dtype}")
        self.frames = frames
        self.version = version
        self.compression = compression
        self.channels = tuple(channels)
        self.pixel_mask = pixel_mask
        self.beam_center = beam_center
        self.repeat = int(repeat)
        self.n_series = int(series)
        self.series_id = int(series_id)
        self.scan_in_user_data = scan_in_user_data
        self.wait_for_peer_s = wait_for_peer_s
        self._ctx = context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.PUSH)
        self._sock.setsockopt(zmq.SNDHWM, sndhwm)
        self._sock.setsockopt(zmq.LINGER, 2000)
        self._sock.bind(endpoint)
        self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._stop = threading.Event()
        self.done = threading.Event()
        self.images_sent = 0
        self.bytes_sent = 0
        self.send_seconds = 0.0
        self._thread: threading.Thread | None = None
        self._encoded = [self._encode_image(i, f) for i, f in enumerate(frames)]

    # --------------------------------------------------------------- messages

    def _encode_image(self, i: int, frame: np.ndarray):
        if self.version == 2:
            return cbor.encode_array(frame, self.compression)
        enc = self.compression or "<"
        if enc == "bslz4":
            enc = f"bs{8 * frame.dtype.itemsize}-lz4<"
        elif enc == "lz4":
            enc = "lz4<"
        return cbor.encode_v1_image(0, 0, frame, enc)

    def start_message(self, series_id: int) -> list[bytes]:
        h, w = self.frames.shape[1:]
        n = self.frames.shape[0] * self.repeat
        if self.version == 2:
            msg = {
                "type": "start", "series_id": series_id, "series_unique_id": f"livestereo-sim-{series_id}",
                "arm_date": time.strftime("%Y-%m-%dT%H:%M:%S"), "channels": list(self.channels),
                "image_size_x": int(w), "image_size_y": int(h), "number_of_images": int(n),
                "count_time": 0.001, "frame_time": 0.001, "detector_description": "livestereo DECTRIS simulator",
                "saturation_value": int(np.iinfo(self.frames.dtype).max), "user_data": {},
            }
            if self.beam_center is not None:
                msg["beam_center_x"], msg["beam_center_y"] = float(self.beam_center[0]), float(self.beam_center[1])
            if self.pixel_mask is not None:
                pm = np.asarray(self.pixel_mask, dtype=np.uint32)
                msg["pixel_mask"] = {c: cbor.encode_array(pm, None) for c in self.channels}
            if self.scan_in_user_data and self.scan_shape:
                msg["user_data"]["scan_shape"] = list(self.scan_shape)
            return [cbor.encode_v2(msg)]
        import json

        detail = "all" if self.pixel_mask is not None else "basic"
        cfg = {"x_pixels_in_detector": int(w), "y_pixels_in_detector": int(h), "nimages": int(n), "ntrigger": 1,
               "trigger_mode": "ints", "count_time": 0.001, "frame_time": 0.001,
               "description": "livestereo DECTRIS simulator"}
        if self.beam_center is not None:
            cfg["beam_center_x"], cfg["beam_center_y"] = float(self.beam_center[0]), float(self.beam_center[1])
        if self.scan_in_user_data and self.scan_shape:
            cfg["user_data"] = {"scan_shape": list(self.scan_shape)}
        parts = [json.dumps({"htype": "dheader-1.0", "series": series_id, "header_detail": detail}).encode(),
                 json.dumps(cfg).encode()]
        if self.pixel_mask is not None:
            pm = np.ascontiguousarray(self.pixel_mask, dtype="<u4")
            ff = np.ones(pm.shape, "<f4")
            parts += [json.dumps({"htype": "dflatfield-1.0", "shape": [w, h], "type": "float32"}).encode(), ff.tobytes(),
                      json.dumps({"htype": "dpixelmask-1.0", "shape": [w, h], "type": "uint32"}).encode(), pm.tobytes(),
                      json.dumps({"htype": "dcountrate_table-1.0", "shape": [2, 1], "type": "float32"}).encode(),
                      np.zeros(2, "<f4").tobytes()]
        return parts

    def image_message(self, series_id: int, image_id: int) -> list[bytes]:
        enc = self._encoded[image_id % len(self._encoded)]
        if self.version == 2:
            msg = {"type": "image", "series_id": series_id, "series_unique_id": f"livestereo-sim-{series_id}",
                   "image_id": image_id, "start_time": [image_id, 1000], "stop_time": [image_id + 1, 1000],
                   "real_time": [1, 1000], "data": {c: enc for c in self.channels}}
            return [cbor.encode_v2(msg)]
        import json

        parts = list(enc)
        parts[0] = json.dumps({"htype": "dimage-1.0", "series": series_id, "frame": image_id, "hash": ""}).encode()
        return parts

    def end_message(self, series_id: int) -> list[bytes]:
        if self.version == 2:
            return [cbor.encode_v2({"type": "end", "series_id": series_id, "series_unique_id": f"livestereo-sim-{series_id}"})]
        import json

        return [json.dumps({"htype": "dseries_end-1.0", "series": series_id}).encode()]

    # --------------------------------------------------------------- serving

    def send(self, parts: list[bytes]) -> None:
        self._sock.send_multipart(parts, copy=len(parts[-1]) < 65536)
        self.bytes_sent += sum(len(p) for p in parts)

    def serve(self) -> None:
        """Send every series (blocks; PUSH holds messages until a peer takes them)."""
        if self.wait_for_peer_s:
            time.sleep(self.wait_for_peer_s)
        n = self.frames.shape[0] * self.repeat
        for k in range(self.n_series):
            sid = self.series_id + k
            self.send(self.start_message(sid))
            t0 = time.perf_counter()
            for i in range(n):
                if self._stop.is_set():
                    return
                self.send(self.image_message(sid, i))
                self.images_sent += 1
            self.send_seconds += time.perf_counter() - t0
            self.send(self.end_message(sid))
        self.done.set()

    def start(self) -> "DectrisSimulator":
        self._thread = threading.Thread(target=self.serve, name="dectris-sim", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._sock.close(linger=0)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Serve a 4D .npy file as a DECTRIS SIMPLON stream.")
    ap.add_argument("path")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=31001)
    ap.add_argument("--version", type=int, default=2, choices=(1, 2))
    ap.add_argument("--compression", default="bslz4")
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args(argv)
    data = np.load(args.path, mmap_mode="r")
    sim = DectrisSimulator(data, endpoint=f"tcp://{args.host}:{args.port}", version=args.version,
                           compression=None if args.compression == "none" else args.compression, repeat=args.repeat)
    print(f"DECTRIS simulator on {sim.endpoint}: {sim.frames.shape[0] * sim.repeat} images")
    sim.serve()
    time.sleep(1)
    sim.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
