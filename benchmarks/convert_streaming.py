"""Streaming whole-brain conversion (``convert selma3d --whole-brain``) vs plain reading of the same slices.

Writes a synthetic light-sheet slice series (int16 TIFF slices, an ellipsoidal "brain" on a dark, noisy
background with negative values) of at least ``--gb`` GB, then measures, each in a fresh process and with the
slice files evicted from the page cache first (a whole brain is larger than RAM, so a user's conversion reads
from disk; the files are flushed and dropped with posix_fadvise, see ``evict``):

  raw read        tifffile.imread of every slice: the read baseline,
  streaming       selma3d.iter_subvolumes without writing: dask reads into the slab, per-tile counts, tile copies,
  convert tif     selma3d.convert --format tif --no-verify: the streaming pass plus zstd TIFF writing of the kept
                  tiles and their ignore labels and dataset.json (the converter's own work: the target),
  raw write       plain writes of as many files and bytes as convert tif wrote (random bytes, no encoding): the
                  write floor; convert tif / (raw read + raw write) is the converter's own overhead,
  + verify        convert tif plus nnU-Net's verify_dataset_integrity, which reads every written file back,
  convert nifti   the defaults: gzip NIfTI and nnU-Net's integrity check.

All modes run in ``--repeats`` interleaved rounds (this machine is noisy; medians are reported). Printed: each
mode's median time and its ratio to the raw read, peak RSS (VmHWM) and the part above the peak right after its
imports (converters with the check import nnU-Net, i.e. torch, before the baseline is taken; the check's own
worker processes are not counted), one slab (size[0] whole slices), and the targets: converter peak RSS / slab
<= 2 and converter time / raw read time <= 2. Written files end in the page cache; the time to flush them to disk
is not counted (it is flushed before the next measurement).

Usage:
    python benchmarks/convert_streaming.py                          # >= 2 GB (256 slices of 2048 x 2048)
    python benchmarks/convert_streaming.py --gb 0.3 --slice 1024 1024 [--workers 2] [--repeats 3] [--workdir DIR]
        [--keep] [--warm]
"""

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile

RESULT = "RESULT "
THRESHOLD, MIN_FOREGROUND = 200, 20.0  # ~400 inside the brain, ~0 outside: drops tiles mostly outside it
_NOISE_SLICES = 8


def peak_rss() -> int:
    """Peak resident set size of this process in bytes.

    VmHWM where there is /proc (it starts afresh at exec; ru_maxrss keeps the forking parent's peak), else
    ru_maxrss (KiB on Linux, bytes on macOS).
    """
    status = Path("/proc/self/status")
    if status.exists():
        line = next(line for line in status.read_text().splitlines() if line.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return usage if sys.platform == "darwin" else usage * 1024


def write_series(folder: Path, n_slices: int, shape: tuple[int, int], seed: int = 0) -> None:
    """``n_slices`` int16 slices (y, x): an ellipse shrinking towards both ends of z, plus Gaussian noise (sd 30)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    y, x = np.ogrid[:shape[0], :shape[1]]
    # Radius 0.6 of the extent: the ellipse covers all but the corners of the middle slices.
    r2 = ((y - shape[0] / 2) / (0.6 * shape[0])) ** 2 + ((x - shape[1] / 2) / (0.6 * shape[1])) ** 2
    noise = rng.normal(0, 30, (_NOISE_SLICES, *shape)).astype(np.int16)
    for z in range(n_slices):
        scale = 1.0 - 0.4 * abs(2 * z / max(n_slices - 1, 1) - 1)
        plane = np.where(r2 < scale ** 2, np.int16(400), np.int16(0))
        plane += np.roll(noise[z % _NOISE_SLICES], 37 * z, axis=1)  # cheap variety without drawing 2 GB of noise
        tifffile.imwrite(folder / f"slice_{z:05d}.tif", plane)


def evict(folder: Path) -> bool:
    """Flush the files of ``folder`` to disk and drop them from the page cache; False where that is unsupported."""
    if not hasattr(os, "posix_fadvise"):
        return False
    os.sync()  # also the previous measurement's output: its write-back must not slow the next one down
    for path in folder.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


# Child modes: (file format, nnU-Net's integrity check) of the converter runs.
CONVERTERS = {"convert tif": ("tif", False), "+ verify": ("tif", True), "convert nifti": ("nifti", True)}
MODES = ("raw read", "streaming", "convert tif", "raw write", "+ verify", "convert nifti")


def child(mode: str, folder: Path, out: Path, size: tuple[int, int, int], workers: int, files: int = 0,
          nbytes: int = 0) -> dict:
    """One measurement, run in a fresh process: seconds, peak RSS, RSS after imports (+ extra counts)."""
    if mode == "raw write":
        target = out / "raw_write"
        target.mkdir(parents=True)
        chunk = np.random.default_rng(0).integers(0, 256, nbytes // files, dtype=np.uint8).tobytes()
        baseline = peak_rss()
        start = time.perf_counter()
        for i in range(files):
            (target / f"{i:06d}.bin").write_bytes(chunk)
        seconds = time.perf_counter() - start
        shutil.rmtree(target)
        return {"seconds": seconds, "peak": peak_rss(), "baseline": baseline}
    if mode == "raw read":
        baseline = peak_rss()
        start = time.perf_counter()
        n = sum(tifffile.imread(path).size > 0 for path in sorted(folder.glob("*.tif")))
        return {"seconds": time.perf_counter() - start, "peak": peak_rss(), "baseline": baseline, "slices": n}
    from nnunet_ext.dataset_conversion import selma3d

    if mode == "streaming":
        baseline = peak_rss()
        start = time.perf_counter()
        volume = selma3d.scan_slice_folder(folder)
        kept = sum(1 for _ in selma3d.iter_subvolumes(volume, size, THRESHOLD, MIN_FOREGROUND, num_workers=workers))
        return {"seconds": time.perf_counter() - start, "peak": peak_rss(), "baseline": baseline, "kept": kept}
    file_format, verify = CONVERTERS[mode]
    if verify:
        import nnunetv2.experiment_planning.verify_dataset_integrity  # noqa: F401  (torch: part of the baseline)
    baseline = peak_rss()
    start = time.perf_counter()
    dataset = selma3d.convert(out, 1, "vessel", whole_brain=[folder], spacing=(6.0, 6.0, 6.0), size=size,
                              threshold=THRESHOLD, min_foreground=MIN_FOREGROUND, num_workers=workers,
                              file_format=file_format, verify=verify)
    seconds = time.perf_counter() - start
    record = json.loads((dataset / "dataset.json").read_text())["selma3d"]["whole_brain"]["brain00"]
    files = [p for p in dataset.rglob("*") if p.is_file()]
    written = sum(p.stat().st_size for p in files)
    shutil.rmtree(dataset)
    return {"seconds": seconds, "peak": peak_rss(), "baseline": baseline, "kept": record["kept"],
            "grid": record["grid"], "written_bytes": written, "written_files": len(files)}


def measure(mode: str, args, folder: Path, out: Path, written: dict | None = None) -> dict:
    cold = not args.warm and evict(folder)
    command = [sys.executable, __file__, "--child", mode, "--folder", str(folder), "--out", str(out),
               "--size", *map(str, args.size), "--workers", str(args.workers)]
    if written is not None:
        command += ["--files", str(written["written_files"]), "--bytes", str(written["written_bytes"])]
    result = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in result.stdout.splitlines() if line.startswith(RESULT)]
    if result.returncode != 0 or not lines:
        raise SystemExit(f"{mode} measurement failed ({result.returncode}):\n{result.stdout[-2000:]}\n"
                         f"{result.stderr[-3000:]}")
    return {**json.loads(lines[-1][len(RESULT):]), "cold": cold}


def report(args, n_slices: int, slab: int, rounds: list[dict]) -> None:
    mb = 1e6
    total = n_slices * args.slice[0] * args.slice[1] * 2
    median = {mode: float(np.median([r[mode]["seconds"] for r in rounds])) for mode in MODES}
    last = rounds[-1]
    cache = "warm (--warm)" if args.warm else ("cold" if last["raw read"]["cold"] else "warm (no posix_fadvise)")
    print(f"data: {n_slices} slices of {args.slice[0]} x {args.slice[1]} int16 = {total / 1e9:.2f} GB; "
          f"sub-volume {' x '.join(map(str, args.size))}, {args.workers} worker thread(s); page cache {cache}; "
          f"median of {len(rounds)} round(s)")
    print(f"slab: {args.size[0]} slices = {slab} bytes ({slab / mb:.1f} MB)")
    print(f"kept {last['convert tif']['kept']} of {math.prod(last['convert tif']['grid'])} sub-volumes; wrote "
          + ", ".join(f"{last[m]['written_bytes'] / mb:.0f} MB ({m})" for m in ("convert tif", "convert nifti")))
    width = 6 * len(rounds) + 4
    print(f"{'process':<15}{'time s':>9}{'all rounds s':>{width}}{'/ raw read':>12}{'peak RSS MB':>13}"
          f"{'above imports MB':>18}")
    for mode in MODES:
        times = " ".join(f"{r[mode]['seconds']:5.2f}" for r in rounds)
        peak = max(r[mode]["peak"] for r in rounds)
        above = max(r[mode]["peak"] - r[mode]["baseline"] for r in rounds)
        print(f"{mode:<15}{median[mode]:>9.2f}{times:>{width}}{median[mode] / median['raw read']:>12.2f}"
              f"{peak / mb:>13.1f}{above / mb:>18.1f}")
    converter = [r["convert tif"] for r in rounds]
    print(f"converter (convert tif) peak RSS / slab: {max(r['peak'] for r in converter) / slab:.2f} absolute, "
          f"{max(r['peak'] - r['baseline'] for r in converter) / slab:.2f} above imports (target <= 2)")
    print(f"converter (convert tif) time / raw read time: {median['convert tif'] / median['raw read']:.2f} "
          f"(target <= 2); with nnU-Net's check {median['+ verify'] / median['raw read']:.2f}; "
          f"defaults (gzip NIfTI + check) {median['convert nifti'] / median['raw read']:.2f}")
    floor = [r["convert tif"]["seconds"] / (r["raw read"]["seconds"] + r["raw write"]["seconds"]) for r in rounds]
    print(f"converter (convert tif) time / (raw read + raw write) time: {np.median(floor):.2f} "
          f"(per round: {' '.join(f'{f:.2f}' for f in floor)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=2.0, help="at least this many GB of slices (default 2)")
    parser.add_argument("--slice", type=int, nargs=2, default=(2048, 2048), metavar=("Y", "X"))
    parser.add_argument("--size", type=int, nargs=3, default=(64, 256, 256), metavar=("Z", "Y", "X"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds of all modes (default 3)")
    parser.add_argument("--warm", action="store_true", help="leave the slices in the page cache (default: evict)")
    parser.add_argument("--workdir", help="folder for the temporary data (default: the system temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the data")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--files", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--bytes", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = child(args.child, Path(args.folder), Path(args.out), tuple(args.size), args.workers, args.files,
                       args.bytes)
        print(RESULT + json.dumps(result))
        return
    slab = args.size[0] * args.slice[0] * args.slice[1] * 2
    n_slices = math.ceil(args.gb * 1e9 / slab) * args.size[0]  # whole slabs: both processes read the same slices
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)  # a named scratch folder need not exist yet
    work = Path(tempfile.mkdtemp(prefix="selma3d_bench_", dir=args.workdir))
    try:
        start = time.perf_counter()
        write_series(work / "slices", n_slices, tuple(args.slice))
        print(f"wrote the slices to {work / 'slices'} in {time.perf_counter() - start:.1f} s")
        rounds = []
        for _ in range(args.repeats):
            results = {}
            for mode in MODES:
                written = results["convert tif"] if mode == "raw write" else None
                results[mode] = measure(mode, args, work / "slices", work / "raw", written)
            rounds.append(results)
        report(args, n_slices, slab, rounds)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
