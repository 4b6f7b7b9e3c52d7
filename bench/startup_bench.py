"""Time from `fedgate serve --config …` to the first 200 on /readyz (issue 3: < 2 s).

    .venv/bin/python bench/startup_bench.py [--runs 5]

Each run starts a fresh process on a fresh dev PKI and SQLite store and polls /readyz
over mTLS every 50 ms; prints the median and the worst run, in seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from stack import Stack  # noqa: E402


async def one_run() -> float:
    with tempfile.TemporaryDirectory() as tmp:
        stack = Stack(Path(tmp), f"sqlite:///{tmp}/state/fedgate.db")
        t0 = time.monotonic()
        stack.spawn()
        try:
            await stack.wait_ready(timeout=30)
            return time.monotonic() - t0
        finally:
            stack.kill_all()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    runs = [asyncio.run(one_run()) for _ in range(args.runs)]
    print(f"serve -> /readyz 200: median {statistics.median(runs):.2f} s, "
          f"worst {max(runs):.2f} s over {len(runs)} runs")


if __name__ == "__main__":
    main()
