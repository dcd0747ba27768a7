"""`livestereo view --connect ... --snapshot-dir ...` as a process, against a PUB socket the test publishes on."""

from __future__ import annotations

import sys
import time

import pytest
import zmq

from livestereo.protocol.live import encode_live
from livestereo.view.launch import connect_endpoint, launch_view, stop_view, view_command
from livestereo.view.synthetic import dislocation_scan


@pytest.fixture(scope="module")
def egl():
    from livestereo.view.app import headless_gl_problem

    problem = headless_gl_problem()
    if problem:
        pytest.skip(f"headless OpenGL (EGL) unavailable: {problem}")


def read_png(path):
    import imageio.v3 as iio

    return iio.imread(path)


def test_view_command_line():
    cmd = view_command("tcp://*:5556", None, ["--max-seconds", "3"])
    assert cmd[:3] == [sys.executable, "-m", "livestereo"]
    assert cmd[3:] == ["view", "--connect", "tcp://127.0.0.1:5556", "--max-seconds", "3"]
    assert connect_endpoint("tcp://0.0.0.0:7000") == "tcp://127.0.0.1:7000"
    assert connect_endpoint("ipc:///tmp/x") == "ipc:///tmp/x"


def test_help_has_examples(capsys):
    from livestereo.cli import main

    with pytest.raises(SystemExit):
        main(["view", "--help"])
    out = capsys.readouterr().out
    assert "--snapshot-dir" in out and "livestereo view --connect" in out


@pytest.mark.gui
def test_headless_view_process_writes_snapshots(tmp_path, egl):
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.linger = 0
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    endpoint = f"tcp://127.0.0.1:{port}"
    snaps = tmp_path / "snaps"
    proc = launch_view(endpoint, snaps, ["--snapshot-interval", "0.2", "--exit-after-scans", "1", "--max-seconds", "60"],
                       log_path=tmp_path / "view.log", snapshots="always")
    try:
        s = dislocation_scan(scan=0, fill=1.0, n_lines=3, shape=(128, 128))
        seq = s.next_pub_seq
        deadline = time.monotonic() + 40
        # PUB drops what is sent before the subscriber has joined: keep publishing until it draws
        while not (snaps / "latest.png").exists():
            assert time.monotonic() < deadline, (tmp_path / "view.log").read_text()
            assert proc.poll() is None, (tmp_path / "view.log").read_text()
            for m in s.messages:
                pub.send_multipart(m)
            time.sleep(0.3)
        for m in dislocation_scan(scan=0, pub_seq=seq, n_lines=3, shape=(128, 128)).messages:
            pub.send_multipart(m)
        pub.send_multipart(encode_live("scan_done", seq + 3, {"complete": True, "frames": 128 * 128, "n_lines": 3},
                                       run_id="synthetic", scan=0))
        assert proc.wait(30) == 0, (tmp_path / "view.log").read_text()
    finally:
        stop_view(proc)
        pub.close()
        ctx.term()
    for name in ("latest.png", "synthetic/scan_0000.png"):  # per scan: <run id>/scan_NNNN.png
        img = read_png(snaps / name)
        assert img.shape[:2] == (800, 1280)
        assert img[..., :3].std() > 20, f"{name} is blank"
        magenta = (img[..., 0] > 180) & (img[..., 1] < 110) & (img[..., 2] > 140)
        assert magenta.sum() > 200, f"{name}: no dislocation overlay"
    assert not list(snaps.rglob(".*.tmp.png"))


@pytest.mark.gui
def test_view_survives_no_publisher_and_sigterm_writes_last_snapshot(tmp_path, egl):
    snaps = tmp_path / "s"
    proc = launch_view("tcp://127.0.0.1:1", snaps, ["--max-seconds", "60"], snapshots="always")  # nobody there
    try:
        time.sleep(2.5)
        assert proc.poll() is None
    finally:
        rc = stop_view(proc, timeout=20)
    assert rc == 0 and (snaps / "latest.png").exists()
