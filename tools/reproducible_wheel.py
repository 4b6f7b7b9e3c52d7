"""Build the wheel twice from two fresh clones of the last commit and compare the bytes.

`make reproducible` (and tests/e2e/test_reproducible.py) run this. Both builds get
``SOURCE_DATE_EPOCH`` = the last commit's time (so every zip entry carries that date)
and the same umask; the wheel backend (setuptools + wheel's bdist_wheel) writes the
entries in sorted order. Prints one line per build (sha256, file name) and exits 0 when
the two wheels are byte-identical, 1 (naming the first differing member) otherwise.

    python tools/reproducible_wheel.py [--keep DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                          text=True).stdout.strip()


def build(clone: Path, out: Path, epoch: str) -> Path:
    env = {**os.environ, "SOURCE_DATE_EPOCH": epoch, "PYTHONHASHSEED": "0"}
    env.pop("PYTHONPATH", None)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out),
                    str(clone)], cwd=clone, env=env, check=True, capture_output=True)
    (wheel,) = out.glob("*.whl")
    return wheel


def first_difference(a: Path, b: Path) -> str:
    with zipfile.ZipFile(a) as za, zipfile.ZipFile(b) as zb:
        ia, ib = za.infolist(), zb.infolist()
        if [i.filename for i in ia] != [i.filename for i in ib]:
            return "the member lists (or their order) differ"
        for x, y in zip(ia, ib, strict=True):
            if (x.date_time, x.external_attr) != (y.date_time, y.external_attr):
                return f"{x.filename}: date or mode differ"
            if za.read(x) != zb.read(y):
                return f"{x.filename}: contents differ"
    return "the archives differ outside the members (zip metadata)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", type=Path, help="keep the two wheels in this directory")
    args = parser.parse_args(argv)
    epoch = git("log", "-1", "--format=%ct")
    os.umask(0o022)  # a clone's file modes follow the umask; fix it for both builds
    with tempfile.TemporaryDirectory(prefix="fedgate-repro-") as tmp:
        wheels = []
        for n in (1, 2):
            clone = Path(tmp) / f"clone{n}"
            git("clone", "--quiet", "--no-local", str(ROOT), str(clone))
            wheels.append(build(clone, Path(tmp) / f"dist{n}", epoch))
        digests = [hashlib.sha256(w.read_bytes()).hexdigest() for w in wheels]
        for digest, wheel in zip(digests, wheels, strict=True):
            print(f"{digest}  {wheel.name}")
        if args.keep is not None:
            args.keep.mkdir(parents=True, exist_ok=True)
            for n, wheel in enumerate(wheels, 1):
                (args.keep / f"{n}-{wheel.name}").write_bytes(wheel.read_bytes())
        if digests[0] != digests[1]:
            print(f"not reproducible: {first_difference(*wheels)}", file=sys.stderr)
            return 1
    print(f"reproducible: SOURCE_DATE_EPOCH={epoch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
