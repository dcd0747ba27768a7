"""The command line: every subcommand explains itself; the status line and progress bar."""

from __future__ import annotations

import io
import logging
import subprocess
import sys

import pytest

from livestereo.cli import build_parser, main
from livestereo.daemon.ingest import Counters
from livestereo.daemon.status import StatusLine

SUBCOMMANDS = ["simulate", "run", "record", "replay", "export", "layout", "demo", "reconstruct", "calibrate", "view", "train"]


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_every_subcommand_has_help_with_examples(name, capsys):
    with pytest.raises(SystemExit) as info:
        main([name, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert f"livestereo {name}" in out and len(out) > 300


def test_top_level_help_lists_the_subcommands():
    out = subprocess.run([sys.executable, "-m", "livestereo", "--help"], capture_output=True, text=True, timeout=60).stdout
    for name in ("simulate", "run", "record", "replay", "export", "layout"):
        assert name in out


def test_bad_config_is_reported_with_the_key(tmp_path, capsys):
    cfg = tmp_path / "daemon.toml"
    cfg.write_text("[layout]\nk = 'four'\n")
    assert main(["run", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "layout.k" in err and "integer" in err


def test_layout_command_prints_the_proposal(capsys):
    assert main(["layout", "--alpha-mrad", "30", "--thickness-nm", "200", "--scan-step-nm", "1", "--dose", "50"]) == 0
    out = capsys.readouterr().out
    assert "stereo angle" in out and "depth precision" in out and "blur at the foil surfaces" in out


def test_status_line_reports_rates_and_counts(caplog):
    c = Counters(frames=0)
    s = StatusLine(0.0, progress=False)
    with caplog.at_level(logging.INFO, "livestereo.status"):
        s.update(c, "run r scan 1/3", 300, force=True)
        c.frames, c.bytes, c.gaps, c.scans_done = 100, 100 * 131072, 2, 1
        c.rejected["bad_payload"] += 3
        s.update(c, "run r scan 2/3", 300, force=True)
    line = caplog.records[-1].getMessage()
    assert line.startswith("run r scan 2/3 | ") and "frames/s" in line and "GB/s" in line
    assert "rejected 3" in line and "gaps 2" in line and "scans done 1" in line and "frames 100" in line
    assert "awaiting" not in line
    s.update(c, "run r scan 2/3", 300, force=True, awaiting_analysis=4)
    assert s.last_line.endswith(" | 4 awaiting analysis")


def test_progress_bar_in_a_terminal():
    buf = io.StringIO()
    s = StatusLine(0.0, progress=True, stream=buf)
    c = Counters(frames=150, bytes=150 * 1000)
    s.update(c, "run r scan 1/2", 300, force=True)
    s.close()
    text = buf.getvalue()
    assert "150/300" in text and "scans done 0" in text


def test_parser_builds_without_heavy_imports():
    code = "import sys, livestereo.cli as c; c.build_parser(); print('torch' in sys.modules, 'vispy' in sys.modules, 'zmq' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout.split()
    assert out == ["False", "False", "False"], out
    assert build_parser() is not None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--thickness-nm", "-5", "--dose", "10"], "--thickness-nm must be a positive number, got -5"),
        (["--thickness-nm", "100", "--dose", "0"], "--dose must be a positive number, got 0"),
        (["--thickness-nm", "100", "--dose", "5", "--k", "1", "3"], "--k: each must be >= 2"),
    ],
)
def test_layout_bad_values_name_the_option(capsys, argv, message):
    assert main(["layout", "--alpha-mrad", "30", "--scan-step-nm", "1", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_replay_of_an_unknown_file_format_says_so(tmp_path, capsys):
    f = tmp_path / "notes.lsrec"
    f.write_bytes(b"abc\n")
    assert main(["replay", str(f), "--speed", "max"]) == 2
    assert "unknown file format" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["simulate", "--set", "repeat=1"], ["replay", "REC"]])
def test_a_malformed_endpoint_is_named(tmp_path, capsys, command):
    if command[-1] == "REC":
        rec = tmp_path / "r.lsrec"
        assert main(["simulate", "--set", "repeat=1", "--set", "scan_shape=[4, 4]", "--record", str(rec)]) == 0
        capsys.readouterr()
        command = ["replay", str(rec)]
    assert main([*command, "--endpoint", "nonsense"]) == 2
    err = capsys.readouterr().err
    assert "cannot bind" in err and "nonsense" in err and "Traceback" not in err


def test_run_refuses_an_unknown_material_at_start(capsys):
    assert main(["run", "--material", "unobtainium", "--max-runs", "1"]) == 2
    err = capsys.readouterr().err
    assert "unknown material 'unobtainium'" in err and "gamma-TiAl" in err


def test_demo_summary_leads_with_the_in_plane_speed(capsys):
    """The demo's track summary: in-plane speed first, the 3D speed labelled as carrying the depth error."""
    from types import SimpleNamespace

    from livestereo.commands.demo import _print_tracks

    tracks = [{"track_id": 0, "first_scan": 0, "last_scan": 5, "mean_speed_nm_s": 6.7, "mean_speed_xy_nm_s": 1.2,
               "median_velocity_sigma_z_nm_s": 4.25},
              {"track_id": 2, "first_scan": 0, "last_scan": 1, "mean_speed_nm_s": 2.0, "mean_speed_xy_nm_s": 1.0},
              {"track_id": 1, "first_scan": 2, "last_scan": 2, "mean_speed_nm_s": None, "mean_speed_xy_nm_s": None}]
    analysis = SimpleNamespace(run_summary=lambda run_id: {"tracks": tracks} if run_id == "demo" else None)
    _print_tracks(SimpleNamespace(analyses=[analysis], runs_ended=[{"run_id": "demo"}, {"run_id": "other"}]))
    out = capsys.readouterr().out
    assert "track 0: scans 0-5, in-plane 1.2 nm/s, 3D 6.7 nm/s (z +/- 4.2 nm/s per step)" in out
    assert "track 2: scans 0-1, in-plane 1.0 nm/s, 3D 2.0 nm/s\n" in out
    assert "track 1: scans 2-2, seen once" in out and "depth error" in out and "other" not in out
