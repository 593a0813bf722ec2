"""Issue 16's goal: the same cells run one after another, then spread out
(``--gpus all``, or ``--executor ray``), each as ``qbench run`` would run
them. Prints both wall times and their ratio, whether every quality figure
is identical, and ``qbench compare``'s verdict on latency (changes beyond
the run-to-run noise).

    python benchmarks/scale_out.py -m /tmp/m1b --device cuda -b fp:bf16,bnb:nf4,torchao:int8-wo --mode gpus
    python benchmarks/scale_out.py --device cpu --threads 1 -b fp:bf16,torchao:int8-wo --mode ray

Arguments other than ``--mode``, ``--output-dir`` and ``--keep`` go to both
``qbench run`` calls unchanged (model, suite, backends, device, threads).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qbench.execute.results import ResultStore
from qbench.present.compare import QUALITY, compare_records

SPREAD = {"gpus": ["--gpus", "all"], "ray": ["--executor", "ray"]}


def timed_run(args: list[str], run_id: str, output: Path) -> float:
    command = [sys.executable, "-m", "qbench.cli", "run", *args, "--run-id", run_id, "-o", str(output)]
    print("$ qbench " + " ".join(command[3:]), flush=True)
    started = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - started
    if done.returncode:
        print(f"  exit {done.returncode}: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ''}")
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=sorted(SPREAD), default="gpus")
    parser.add_argument("--output-dir", default=None, help="where the two runs go (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the runs' folders")
    known, passed = parser.parse_known_args()
    output = Path(known.output_dir or tempfile.mkdtemp(prefix="qbench-scale-out-"))
    serial_s = timed_run(passed, "serial", output)
    spread_s = timed_run(passed + SPREAD[known.mode], f"spread-{known.mode}", output)
    serial = ResultStore(output / "serial").latest()
    spread = ResultStore(output / f"spread-{known.mode}").latest()
    cells = [c for c in serial if c in spread and serial[c].ok and spread[c].ok]
    differ = [f"{c} {m}: {serial[c].value(m)!r} vs {spread[c].value(m)!r}" for c in cells for m in QUALITY
              if serial[c].value(m) != spread[c].value(m)]
    _, rows, flagged = compare_records(serial, spread)
    latency_rows = [r for r in rows if r[1] in ("prefill_ms", "decode_ms_per_token")]
    print(f"cells: {len(cells)} finished in both runs of {len(serial)} (serial) and {len(spread)} ({known.mode})")
    print(f"wall: serial {serial_s:.1f} s, {known.mode} {spread_s:.1f} s, speedup {serial_s / spread_s:.2f}x")
    print("quality figures: " + ("identical" if not differ else f"{len(differ)} differ, first: {differ[0]}"))
    beyond = [r for r in latency_rows if r[-1] == "YES"]
    print(f"latency: {len(latency_rows)} figures compared, {len(beyond)} beyond the run-to-run noise"
          + "".join(f"\n  {r[0]} {r[1]}: {r[2]} -> {r[3]}" for r in beyond))
    print(f"all changes flagged by qbench compare: {flagged}")
    if not known.keep and not known.output_dir:
        shutil.rmtree(output, ignore_errors=True)
    return 0 if not differ else 1


if __name__ == "__main__":
    sys.exit(main())
