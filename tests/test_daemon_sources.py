"""Real detector files through the daemon's own ingest path (`livestereo run --source FILE`)."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import numpy as np
import pytest

from livestereo.compute.layouts import LayoutSpec, build_layout
from livestereo.daemon.offline import accumulate_file
from livestereo.daemon.results import read_scan, scan_path
from livestereo.protocol.messages import Calibration
from tests.conftest import SHARED_DATA, reference_images

MERLIN = SHARED_DATA / "merlin"
pytestmark = pytest.mark.skipif(not MERLIN.is_dir(), reason=f"real detector files not found at {MERLIN}")


@pytest.fixture(scope="module")
def mib(tmp_path_factory):
    out = tmp_path_factory.mktemp("merlin")
    with zipfile.ZipFile(MERLIN / "Merlin_navigation4x2_ROI.zip") as z:
        z.extractall(out)
    return out / "001_4x2_6bit.mib"


def _reference_frames(path):
    """Independent reader: MQ1 headers give the offset; U08 pixels, 8 frames of 256x256."""
    raw = path.read_bytes()
    header_size = int(raw[:100].split(b",")[2])
    stride = header_size + 256 * 256
    return np.stack([np.frombuffer(raw, np.uint8, 256 * 256, i * stride + header_size).reshape(256, 256) for i in range(8)])


def test_merlin_mib_through_ingest_equals_numpy(mib):
    cal = Calibration(convergence_semiangle_mrad=20.0, scan_step_nm=1.0, mrad_per_px=0.4, disc_center_px=(127.5, 127.5), disc_radius_px=50.0)
    scans = accumulate_file(mib, calibration=cal, layout=LayoutSpec(kind="multiview", k=4), scan_shape=(2, 4))
    assert len(scans) == 1 and scans[0].complete
    s = scans[0]
    assert s.images.shape == (4, 2, 4)  # the header has no ScanX/ScanY: given
    frames = _reference_frames(mib)
    weights = np.stack([d.weights for d in build_layout(LayoutSpec(kind="multiview", k=4), _start_like(s, cal)).detectors]).reshape(4, -1)
    ref = reference_images(frames, weights, 0, 8).reshape(4, 2, 4)
    np.testing.assert_allclose(s.images, ref, rtol=1e-12)


def _start_like(s, cal):
    from livestereo.protocol.messages import StartMessage

    return StartMessage(version=1, run_id="x", detector="pixelated", scan_shape=(2, 4), frame_shape=(256, 256), dtype="uint8", calibration=cal)


def test_cli_run_on_a_mib_file(mib, tmp_path):
    cal = tmp_path / "cal.toml"
    cal.write_text("convergence_semiangle_mrad = 20.0\nscan_step_nm = 1.0\nmrad_per_px = 0.4\n"
                   "disc_center_px = [127.5, 127.5]\ndisc_radius_px = 50.0\n")
    out = subprocess.run([sys.executable, "-m", "livestereo", "run", "--source", str(mib), "--calibration", str(cal),
                          "--scan-shape", "2", "4", "--output-dir", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    files = sorted((tmp_path / "out").rglob("scan_0000.h5"))
    assert len(files) == 1
    got = read_scan(files[0])
    assert got["complete"] and got["images"].shape == (2, 2, 4)


def test_guessed_scan_shape_is_warned_about(mib, caplog):
    import logging

    with caplog.at_level(logging.WARNING, "livestereo.ingest"):
        # no calibration at all: these frames have no BF disc to find, which is said clearly
        with pytest.raises(ValueError, match="no scan could be accumulated.*no_disc"):
            accumulate_file(mib, calibration=None, layout=LayoutSpec(kind="bf_adf"))
    assert "was guessed as (1, 8)" in caplog.text and "placeholder calibration" in caplog.text
    assert "BF disc not found in the first 8 frames" in caplog.text


def test_cli_run_reports_a_missing_file(tmp_path):
    out = subprocess.run([sys.executable, "-m", "livestereo", "run", "--source", str(tmp_path / "nope.mib")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "no such file" in out.stdout + out.stderr
