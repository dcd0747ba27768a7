"""Scan files written from a run's byte template equal those written through h5py."""

from __future__ import annotations

import logging

import h5py
import numpy as np
import pytest

from livestereo.daemon import results
from livestereo.daemon.products import LayoutInfo, ScanImages
from livestereo.daemon.scan_template import ScanTemplate
from livestereo.protocol.messages import Calibration


def _run(rng, n_det=3, det=(20, 24)):
    w = (rng.random((n_det, *det)) > 0.6).astype(np.float32)
    lay = LayoutInfo(tuple(f"v{i}" for i in range(n_det)), ("view",) * n_det, rng.normal(size=(n_det, 2)), w,
                     (9.5, 11.0), 7.0)
    return lay, Calibration(convergence_semiangle_mrad=30.0, scan_step_nm=1.5)


def _scan(rng, lay, cal, i, shape=(6, 7), run_id="r1", complete=True, finished=123.5, meta=None):
    valid = rng.random(shape) > 0.3
    stats = {"frames": 40 + i, "duplicates": i % 2, "gaps": 3 * i, "positions_filled": int(valid.sum()),
             "positions_missing": int(valid.size - valid.sum()), "started": 1e9 + i, "finished": finished}
    return ScanImages(run_id, i, 7, rng.normal(size=(len(lay.names), *shape)), valid, lay, cal,
                      meta if meta is not None else {"sample": "TiAl", "n": i // 100}, True, complete, stats)


def _contents(path) -> dict:
    """Every attribute and dataset of a file, with dtypes, as comparable plain values."""
    out = {}

    def attrs(name, obj):
        for k, v in obj.attrs.items():
            a = np.asarray(v)
            out[f"{name}@{k}"] = (a.dtype.str if a.dtype.kind != "O" else "O", a.tolist())

    with h5py.File(path, "r") as f:
        attrs("/", f)

        def visit(name, obj):
            attrs(name, obj)
            if isinstance(obj, h5py.Dataset):
                out[name] = (obj.dtype.str, obj.shape, obj.chunks, obj.compression, obj[()].tolist())
        f.visititems(visit)
    return out


def _h5py_written(scan, path):
    values = results._scan_values(scan)
    with h5py.File(path, "w", libver="earliest") as f:
        results._fill_scan(f, scan, values, np.asarray(scan.images), np.asarray(scan.valid))
    return path


def test_template_files_equal_h5py_files_scan_after_scan(tmp_path):
    rng = np.random.default_rng(0)
    lay, cal = _run(rng)
    for i, (complete, finished) in enumerate([(True, 10.25), (False, 11.5), (True, 12.0), (False, 1e10)]):
        scan = _scan(rng, lay, cal, i, complete=complete, finished=finished)
        got = results.write_scan(scan, tmp_path / f"t{i}.h5")
        want = _h5py_written(scan, tmp_path / f"h{i}.h5")
        assert _contents(got) == _contents(want)
        assert got.read_bytes() == want.read_bytes()  # the same file, byte for byte
        back = results.read_scan(got)
        np.testing.assert_array_equal(back["images"], scan.images)
        np.testing.assert_array_equal(back["valid"], scan.valid)
        assert back["scan"] == i and bool(back["complete"]) is complete and back["finished"] == finished
        assert back["frames"] == 40 + i and back["gaps"] == 3 * i
    assert not list(tmp_path.glob("*.part"))


def test_a_new_template_where_the_file_changes_shape(tmp_path):
    """Another scan shape, run id, metadata, a stat missing (None) or a float where an int
    was: each gets its own template and a file equal to h5py's."""
    rng = np.random.default_rng(1)
    lay, cal = _run(rng)
    lay2, cal2 = _run(rng, n_det=5, det=(8, 8))
    base = _scan(rng, lay, cal, 0)
    variants = [
        base,
        _scan(rng, lay, cal, 1, shape=(3, 9)),
        _scan(rng, lay, cal, 2, run_id="another run"),
        _scan(rng, lay, cal, 3, meta={"note": "x" * 500}),
        _scan(rng, lay, cal, 4, finished=None),  # a partial scan: no "finished" attribute
        _scan(rng, lay2, cal2, 5),
        _scan(rng, lay, cal, 6),
    ]
    for i, scan in enumerate(variants):
        got = results.write_scan(scan, tmp_path / f"t{i}.h5")
        assert _contents(got) == _contents(_h5py_written(scan, tmp_path / f"h{i}.h5")), i
    with h5py.File(tmp_path / "t4.h5") as f:
        assert "finished" not in f.attrs
    with h5py.File(tmp_path / "t5.h5") as f:
        assert f["images"].shape == (5, 6, 7) and f["layout/weights"].shape == (5, 8, 8)


def test_a_template_that_cannot_be_built_falls_back_to_h5py(tmp_path, monkeypatch, caplog):
    rng = np.random.default_rng(2)
    lay, cal = _run(rng)

    def refuse(*a, **k):
        raise ValueError("laid out differently")

    monkeypatch.setattr(ScanTemplate, "build", classmethod(refuse))
    scans = [_scan(rng, lay, cal, i, run_id="fallback") for i in range(2)]
    with caplog.at_level(logging.WARNING):
        for i, scan in enumerate(scans):
            got = results.write_scan(scan, tmp_path / f"t{i}.h5")
            assert _contents(got) == _contents(_h5py_written(scan, tmp_path / f"h{i}.h5"))
    assert sum("laid out differently" in r.getMessage() for r in caplog.records) == 1  # once per run


def test_a_template_refuses_what_it_cannot_patch():
    rng = np.random.default_rng(3)
    lay, cal = _run(rng)
    scan = _scan(rng, lay, cal, 0)
    values = dict(results._scan_values(scan), note="a string")

    def fill(f, v, i, m):
        results._fill_scan(f, scan, v, i, m)

    with pytest.raises(TypeError, match="fixed-size number"):
        ScanTemplate.build(fill, values, scan.images, scan.valid)
    t = ScanTemplate.build(fill, results._scan_values(scan), scan.images, scan.valid)
    # the template keeps the file's fixed bytes only, not a copy of the data regions
    size = len(b"".join(t.render(results._scan_values(scan), scan.images, scan.valid)))
    assert sum(map(len, t.static)) == size - scan.images.nbytes - scan.valid.nbytes
    with pytest.raises(ValueError, match="does not fit"):
        t.render(results._scan_values(scan), scan.images[:, :2], scan.valid)
    with pytest.raises(ValueError, match="does not fit"):
        t.render(dict(results._scan_values(scan), extra=1), scan.images, scan.valid)
