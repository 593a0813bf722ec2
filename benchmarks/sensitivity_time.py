"""Issue 14's sensitivity goal: one 4-bit variant of the embedded model,
per layer type x block (every linear layer on its own), timed end to end
on this machine. Prints the wall time, the time per unit and the ten most
harmful layers.

    .venv/bin/python benchmarks/sensitivity_time.py                       # torchao:int4-wo-g32, 1024 tokens (qbench's default)
    .venv/bin/python benchmarks/sensitivity_time.py --tokens 2048 --variant torchao:int4-wo-g128
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch


def main() -> None:
    from qbench.api import sensitivity

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="torchao:int4-wo-g32")
    parser.add_argument("--unit", default="layer", choices=("layer", "type", "block"))
    parser.add_argument("--tokens", type=int, default=1024)
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        table, _ = sensitivity(args.variant, unit=args.unit, device="cpu", max_tokens=args.tokens, output_dir=out,
                               run_id="bench")
    seconds = time.perf_counter() - started
    print(f"{args.variant}, unit {args.unit}, {len(table)} units, {args.tokens} scored tokens each, "
          f"{torch.get_num_threads()} threads: {seconds:.0f} s in all ({seconds / 60:.1f} min, goal <= 10 min), "
          f"{table['seconds'].mean():.2f} s per unit")
    print(table.head(10).to_string(index=False))


if __name__ == "__main__":
    main()
