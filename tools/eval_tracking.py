"""Benchmark of in-situ tracking against the simulator's truth (not a test).

    .venv/bin/python tools/eval_tracking.py                  # 4 series of 8 scans, ~75 s on 2 cores
    .venv/bin/python tools/eval_tracking.py --seeds 7 --scans 6
    .venv/bin/python tools/eval_tracking.py --track max_distance_nm=15 --track z_weight=0.5   # other settings

For each seed it simulates the in-situ series of ``configs/sim_tial_insitu.toml`` (gliding
dislocations, drift, scan jitter; ``--set seed=S --set repeat=N``) as a recording with its
ground truth (``livestereo simulate --record --truth``), runs ``livestereo reconstruct`` on
the recording (the live daemon's tracker and settings: its tracks equal the live daemon's),
and compares every continued track step with the truth:

- each reconstructed line lies on the true dislocations whose curves are within
  ``--max-distance-nm`` (median distance of its points) in projection (x, y: which
  dislocation a line is does not depend on its depth error, several nm at this series' 2 deg
  stereo angle); several where true curves overlap in projection, none for a false line;
- identity: a continued step (one-to-one or a fragment, a further line of a track in the
  same scan) is an identity switch when its line and the track's previous line(s) lie on no
  common true dislocation; a new track is an identity lost when its line lies on a true
  dislocation that a line of the previous scan lay on (it was followed, and now starts over);
- velocity (steps whose two lines lie on one common dislocation, the nearest one): the true
  velocity of a dislocation from scan s-1 to s is the tracker's own
  displacement measure (mean perpendicular motion, LineTracker) between its two true
  curves, over the same scan mid-times; it includes the drift, as the reconstruction does.
  Printed: median true speed, median |error| of the in-plane (x, y) velocity and of the z
  velocity (nm/s), the in-plane error relative to the true in-plane speed, and how often the
  z velocity's error lies within 1 and 2 of its stated uncertainty (velocity_sigma_z_nm_s;
  a Gaussian: 68 % and 95 %).

Simulated data and results go to a temporary folder (``--keep DIR`` to keep them).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
from scipy.spatial import cKDTree

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from livestereo.compute.tracking import LineTracker, resample_polyline  # noqa: E402

SIM_CONFIG = ROOT / "configs" / "sim_tial_insitu.toml"


def _cli(*args: str) -> None:
    out = subprocess.run([sys.executable, "-m", "livestereo", *args], cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"livestereo {' '.join(args)} failed:\n{out.stderr[-3000:]}")


def simulate_and_reconstruct(seed: int, scans: int, work: Path, track: list[str] = ()) -> tuple[Path, Path]:
    """(truth file, results folder) of one simulated series; ``track``: KEY=VALUE tracking
    settings for ``livestereo reconstruct --set track.KEY=VALUE``."""
    rec, truth, res = work / f"series_{seed}.lsrec", work / f"truth_{seed}.h5", work / f"results_{seed}"
    _cli("simulate", "--config", str(SIM_CONFIG), "--set", f"seed={seed}", "--set", f"repeat={scans}",
         "--run-id", f"eval-{seed}", "--record", str(rec), "--truth", str(truth))
    _cli("reconstruct", str(rec), "-o", str(res), *[a for kv in track for a in ("--set", f"track.{kv}")])
    return truth, res


def read_truth(path: Path) -> list[dict[int, np.ndarray]]:
    """Per scan {dislocation id: (n, 3) curve x, y, z, nm}."""
    with h5py.File(path, "r") as f:
        names = sorted(k for k in f if k.startswith("scan_"))
        curves = [{int(k): np.asarray(v[()], np.float64) for k, v in f[n]["curves"].items()} for n in names]
    return curves


def read_results(folder: Path) -> list[dict]:
    """Per scan: ``lines`` {line id: points (n, 3) nm}, ``time_s``, and the /tracks datasets."""
    out = []
    for path in sorted(folder.glob("scan_*.h5")):
        with h5py.File(path, "r") as f:
            t = f["tracks"]
            out.append({
                "lines": {int(k): np.asarray(g["points_nm"][()]) for k, g in f["lines"].items()},
                "time_s": float(t.attrs["time_s"]),
                "line_id": t["line_id"][()].astype(int), "track_id": t["track_id"][()].astype(int),
                "status": [s.decode() if isinstance(s, bytes) else str(s) for s in t["status"][()]],
                "velocity": t["velocity_nm_s"][()],
                "sigma_vz": t["velocity_sigma_z_nm_s"][()],
            })
    return out


def median_distance(points: np.ndarray, curve: np.ndarray) -> float:
    """Median over ``points`` (n, d) of the distance to the nearest vertex of ``curve`` (m, d)
    resampled at 0.25 nm (nm)."""
    return float(np.median(cKDTree(resample_polyline(curve, 0.25)).query(points)[0]))


def true_velocity(old: np.ndarray, new: np.ndarray, dt: float) -> np.ndarray | None:
    """(3,) nm/s: the tracker's displacement measure between two true curves of one dislocation
    (depth weighted fully: the true depth has no error)."""
    tr = LineTracker(max_distance_nm=1e9, z_weight=1.0)
    tr.update(0, 0.0, [old])
    step = tr.update(1, dt, [new])[0]
    return None if step.velocity_nm_s is None else np.asarray(step.velocity_nm_s, float)


def evaluate_series(truth_path: Path, results: Path, max_distance_nm: float) -> dict:
    curves = read_truth(truth_path)
    scans = read_results(results)
    if len(scans) != len(curves):
        raise RuntimeError(f"{results}: {len(scans)} scans reconstructed, the truth has {len(curves)}")
    # per scan: line id -> the true dislocation ids it lies on, nearest first
    on: list[dict[int, list[int]]] = []
    for s, sc in enumerate(scans):
        a = {}
        for lid, pts in sc["lines"].items():
            d = {k: median_distance(pts[:, :2], c[:, :2]) for k, c in curves[s].items()}
            a[lid] = sorted((k for k in d if d[k] <= max_distance_nm), key=d.get)
        on.append(a)
    # track id -> (the scan it was last seen in, the true dislocations its line lay on); a
    # track may skip a scan (LineTracker.max_missed), so that is not always scan s - 1
    last_of_track: dict[int, tuple[int, list[int]]] = {}
    rows, switches, continued, unmatched, lost, fragments = [], 0, 0, 0, 0, 0
    for s, sc in enumerate(scans):
        seen_before = {k for ks in on[s - 1].values() for k in ks} if s else set()
        last_now: dict[int, tuple[int, list[int]]] = {}
        for lid, tid, status, vel, svz in zip(sc["line_id"], sc["track_id"], sc["status"], sc["velocity"], sc["sigma_vz"]):
            now = on[s].get(int(lid), [])
            ps, prev = last_of_track.get(int(tid), (s - 1, []))
            last_now.setdefault(int(tid), (s, []))[1].extend(now)  # a track's fragments: all their dislocations
            if status == "new":
                lost += bool(set(now) & seen_before)
                continue
            fragments += status == "fragment"
            continued += 1
            if not now or not prev:
                unmatched += 1
                continue
            common = [k for k in now if k in prev]
            if not common:
                switches += 1
                continue
            k = common[0]
            if k not in curves[ps] or not np.all(np.isfinite(vel)):
                continue
            v_true = true_velocity(curves[ps][k], curves[s][k], sc["time_s"] - scans[ps]["time_s"])
            if v_true is not None:
                rows.append((np.asarray(vel, float), v_true, float(svz)))
        last_of_track.update(last_now)
    est = np.array([r[0] for r in rows]).reshape(-1, 3)
    tru = np.array([r[1] for r in rows]).reshape(-1, 3)
    return {"scans": len(scans), "continued": continued, "switches": switches, "unmatched": unmatched,
            "lost": lost, "fragments": fragments,
            "est": est, "true": tru, "sigma_vz": np.array([r[2] for r in rows])}


def _fmt(name: str, r: dict) -> str:
    est, tru = r["est"], r["true"]
    if len(est) == 0:
        return (f"{name:>12}  {r['scans']:>5}  {r['continued']:>9}  {r['fragments']:>9}  {r['lost']:>5}  {r['switches']:>8}  "
                f"{r['unmatched']:>9}  (no steps to compare)")
    err = est - tru
    z_in = np.abs(err[:, 2]) / r["sigma_vz"]  # NaN where the lines had no depth sigma
    z_in = z_in[np.isfinite(z_in)]
    cover = f"{100 * np.mean(z_in <= 1):>5.0f} % {100 * np.mean(z_in <= 2):>4.0f} %" if z_in.size else f"{'-':>12}"
    sp_xy = np.linalg.norm(tru[:, :2], axis=1)
    e_xy = np.linalg.norm(err[:, :2], axis=1)
    return (f"{name:>12}  {r['scans']:>5}  {r['continued']:>9}  {r['fragments']:>9}  {r['lost']:>5}  {r['switches']:>8}  "
            f"{r['unmatched']:>9}  {len(est):>8}  "
            f"{np.median(np.linalg.norm(tru, axis=1)):>10.2f}  {np.median(sp_xy):>9.2f}  {np.median(e_xy):>10.2f}  "
            f"{np.median(np.abs(err[:, 2])):>9.2f}  {np.median(e_xy / np.maximum(sp_xy, 1e-9)):>11.2f}  {cover}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[7, 11, 12, 13],
                    help="simulator seeds, one series each (7: the demo's series)")
    ap.add_argument("--scans", type=int, default=8, help="scans per series")
    ap.add_argument("--max-distance-nm", type=float, default=3.0,
                    help="a line farther than this (median, in projection) from every true curve is unmatched")
    ap.add_argument("--track", action="append", default=[], metavar="KEY=VALUE",
                    help="tracking setting (max_distance_nm, z_weight) instead of the daemon's default; repeatable")
    ap.add_argument("--keep", type=Path, default=None, help="keep recordings, truth and results here")
    args = ap.parse_args(argv)
    if args.scans < 2:
        ap.error("--scans must be >= 2 (tracking needs two scans)")
    t0 = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for seed in args.seeds:
            truth, res = simulate_and_reconstruct(seed, args.scans, work, args.track)
            results[seed] = evaluate_series(truth, res, args.max_distance_nm)
            print(f"seed {seed}: done after {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"\nin-situ tracking vs truth ({SIM_CONFIG.name}, {args.scans} scans per series; velocities nm/s"
          + (f"; tracking {', '.join(args.track)}" if args.track else "") + ")")
    print(f"{'series':>12}  {'scans':>5}  {'continued':>9}  {'fragments':>9}  {'lost':>5}  {'switches':>8}  "
          f"{'unmatched':>9}  {'compared':>8}  "
          f"{'true speed':>10}  {'true xy':>9}  {'|err xy|':>10}  {'|err z|':>9}  {'err xy/true':>11}  {'z in 1 / 2 sigma':>16}")
    for seed, r in results.items():
        print(_fmt(f"seed {seed}", r))
    if len(results) > 1:
        allr = {"scans": sum(r["scans"] for r in results.values()),
                "continued": sum(r["continued"] for r in results.values()),
                "switches": sum(r["switches"] for r in results.values()),
                "unmatched": sum(r["unmatched"] for r in results.values()),
                "lost": sum(r["lost"] for r in results.values()),
                "fragments": sum(r["fragments"] for r in results.values()),
                "est": np.concatenate([r["est"] for r in results.values()]),
                "true": np.concatenate([r["true"] for r in results.values()]),
                "sigma_vz": np.concatenate([r["sigma_vz"] for r in results.values()])}
        print(_fmt("all", allr))
    print("\n(medians over the compared steps; continued: steps that continue a track (fragments among them: "
          "further lines of a track in one scan); lost: new tracks whose line lies on a true dislocation that a line "
          "of the previous scan lay on; switches: continued steps whose line and the track's previous line(s) "
          "lie on no common true dislocation; unmatched: a line of the step lies on no true curve; z in 1 / 2 sigma: "
          "share of the steps whose z velocity error is within 1 / 2 x velocity_sigma_z_nm_s)")
    print(f"eval wall time {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
