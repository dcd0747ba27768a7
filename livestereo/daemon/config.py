"""Configuration of ``livestereo run`` (TOML, see configs/daemon.toml)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from livestereo.compute.layouts import LayoutSpec


class Limits(BaseModel):
    """Bounds that protect the daemon from declared shapes meant to exhaust memory."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    max_frame_bytes: int = Field(default=64 * 2**20, gt=0)
    """Largest accepted frame (bytes): a 4096x4096 uint32 frame is 64 MiB."""

    max_positions: int = Field(default=4096 * 4096, gt=0)
    """Largest accepted scan (positions per scan)."""

    max_image_bytes: int = Field(default=4 * 2**30, gt=0)
    """Largest accepted set of virtual images for one scan (bytes, float64 per detector and position)."""

    max_buffered_frames: int = Field(default=256, gt=0)
    """Frames held back while the BF disc is being found from the first frames."""


class DaemonConfig(BaseModel):
    """Everything ``livestereo run`` needs; every field can also be set on the command line."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    endpoint: str = "tcp://127.0.0.1:5555"
    """ZeroMQ endpoint of the stream (the source binds, the daemon connects)."""

    pattern: Literal["pull", "sub"] = "pull"
    """PULL: lossless with back-pressure (default). SUB: several watchers, drops possible."""

    rcvhwm: int = Field(default=16, gt=0)
    """ZeroMQ receive high-water mark: messages queued before back-pressure. Bounds memory:
    16 messages of 64 frames of 256x256 uint16 hold 128 MiB."""

    layout: LayoutSpec = Field(default_factory=LayoutSpec)
    """Virtual detectors to accumulate."""

    output_dir: Path = Path("results")
    """Per-run folder of per-scan HDF5 results and run.json is created here."""

    record: Path | None = None
    """Also record the raw stream to this file (livestereo recording)."""

    disc_frames: int = Field(default=32, gt=0)
    """Frames summed to find the BF disc when the start message does not give it."""

    idle_timeout_s: float = Field(default=10.0, gt=0)
    """A run with no message for this long is closed as 'sender_lost' (scan reported incomplete)."""

    snapshot_interval_s: float = Field(default=0.1, ge=0)
    """Period of partial-image snapshots for inference and the view (s)."""

    status_interval_s: float = Field(default=1.0, gt=0)
    """Period of the status line (s)."""

    particles: bool = True
    """Reconstruct nanoparticles (live and per scan) in runs of a segmented detector."""

    particles_config: Path | None = None
    """Particle pipeline parameters and segment calibration (TOML, see configs/particles.toml)."""

    publish: str | None = None
    """Publish snapshots and results on this ZeroMQ endpoint (PUB socket, bound by the daemon,
    e.g. tcp://127.0.0.1:5556; README "Live results stream"). None: no publisher."""

    publish_sndhwm: int = Field(default=4, gt=0)
    """Messages queued per subscriber before a slow subscriber loses messages (never waits)."""

    publish_idle: bool = True
    """The publisher builds and sends its messages in the SCHED_IDLE class (Linux): on a
    machine that ingest keeps busy, clients get fewer snapshots instead of ingest slowing."""

    inference: bool = True
    """Reconstruct dislocations (live on snapshots and per scan) in runs with two or more
    stereo views of a pixelated detector (needs the torch networks)."""

    inference_threads: int = Field(default=1, ge=1)
    """torch threads for the live dislocation networks (keep a core for ingest)."""

    inference_interval_s: float = Field(default=0.0, ge=0)
    """Least time between two live analyses of snapshots (s); 0: back to back. Caps the CPU
    live inference takes from ingest on small machines; finished scans are always analysed."""

    live_niceness: int = Field(default=10, ge=0, le=19)
    """Added to the nice value of the threads analysing live snapshots (Linux) when they do not
    run in the idle class (``live_idle = false``): on a busy machine ingest (and a sender on
    the same machine) come first and live results come later, never the other way round."""

    live_idle: bool = True
    """Live snapshot analyses run in the SCHED_IDLE class (Linux): only on CPU time nothing of
    normal priority wants, yielding at once when ingest needs it; ``live_niceness`` then does
    not apply. A starved live analysis loses nothing: the next snapshot replaces it."""

    final_idle: bool = True
    """The analyses of finished scans (3D reconstruction, tracking) run in the SCHED_IDLE class
    (Linux). When scans finish faster than they can be reconstructed (a replay at full speed
    on a small machine), ingest keeps its pace and the reconstructions follow in order as the
    CPU frees; each scan's HDF5 file is written at once by the results writer, at normal
    priority, whatever the analyses do (tools/bench_live.py (b): ingest 0.89x of the bare
    daemon with nice 19, 0.98x idle). On an idle machine it changes nothing. Waiting scans
    (a few MB each) are counted in the status (``scans_awaiting_analysis``). false:
    ``final_niceness`` applies instead."""

    final_niceness: int = Field(default=0, ge=0, le=19)
    """Added to the nice value of the results writer (and of the final analyses when they do
    not run in the idle class) (Linux)."""

    detector_weights: Path | None = None
    """Detection network weights (default: the shipped livestereo/weights/detector.pt)."""

    stereo_weights: Path | None = None
    """Stereo network weights (default: the shipped livestereo/weights/stereo.pt)."""

    detector_precision: Literal["auto", "float32", "bfloat16"] = "auto"
    """Arithmetic of the detection network: "auto" runs it in bfloat16 on a CPU that does
    bfloat16 natively (AMX or AVX512-BF16: ~2.5x faster, same detections within the
    benchmark's noise), else in float32."""

    volume_precision: Literal["auto", "float32", "bfloat16"] = "auto"
    """Arithmetic of the stereo network's cost-volume branch (its half- and quarter-resolution
    features and the 3D regulariser, half its time): "auto" runs it in bfloat16 on a CPU that
    does bfloat16 natively (same disparities within the benchmark's noise), else in float32;
    the full-resolution features and the sub-pixel refinement stay float32."""

    thickness_nm: float | None = Field(default=None, gt=0)
    """Foil thickness (nm) when the start message's metadata does not give it."""

    material: str | None = None
    """Material preset or TOML (crystal frame of the lines) when the metadata does not give it."""

    @field_validator("material")
    @classmethod
    def _known_material(cls, v: str | None) -> str | None:
        if v is not None:
            from livestereo.compute.crystal import MaterialError, load_material

            try:
                load_material(v)
            except MaterialError as exc:
                raise ValueError(str(exc)) from None
        return v

    track_max_distance_nm: float = Field(default=8.0, gt=0)
    """In-situ tracking gate: a line farther than this from a track never continues it (nm).
    Set it to about the largest motion expected between two scans plus ~2 nm: a wider gate
    lets a track whose line was missed in a scan take a neighbouring dislocation's line."""

    track_z_weight: float = Field(default=0.25, ge=0)
    """Weight of depth in the tracking distance: at stereo angles of 1-7 deg the depth of a
    line is some 5-30x less precise than its position in the image (tools/eval_tracking.py)."""

    track_clock: Literal["auto", "frames", "wall"] = "auto"
    """Scan times for velocities: "frames" = scan number x positions x calibration frame_time_s
    (back-to-back scans), "wall" = mid-time of the scan's arrival, "auto" = frames when the
    calibration gives frame_time_s, else wall."""

    max_runs: int | None = Field(default=None, ge=1)
    """Stop after this many runs have ended (None: run until interrupted)."""

    limits: Limits = Field(default_factory=Limits)
    """Input bounds."""
