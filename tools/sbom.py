"""The CycloneDX SBOM of fedgate's installed dependency set, and shipping it in the wheel.

    python tools/sbom.py generate OUT.json [--python PY] [--tools-venv DIR]
    python tools/sbom.py attach WHEEL SBOM.json

``generate`` runs ``cyclonedx-py environment`` (PyPI ``cyclonedx-bom``, the ``sbom``
extra) against the interpreter fedgate runs in (default: this one), with
``--output-reproducible`` (no timestamp, no random serial number: the same environment
gives the same bytes). The generator lives in its own virtualenv (default ``.venv-sbom``,
made on first use): its dependencies pull in ``jsonschema[format]``, whose
``rfc3987-syntax`` makes ``import jsonschema`` ~9 s slower here, so it stays out of the
environment it describes.

``attach`` puts the SBOM into the wheel as ``<name>.dist-info/sboms/fedgate.cdx.json``
(PEP 770's place for SBOMs in a wheel), adds it to RECORD, and rewrites the archive with
sorted entries dated ``SOURCE_DATE_EPOCH`` (default: the last commit's time), so the
result is as reproducible as its inputs.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GENERATOR = "cyclonedx-bom>=7,<8"  # pyproject.toml [project.optional-dependencies] sbom


def tools_venv(path: Path) -> Path:
    exe = path / "bin" / "cyclonedx-py"
    if not exe.exists():
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
        subprocess.run([str(path / "bin" / "pip"), "install", "-q", GENERATOR], check=True)
    return exe


def generate(out: Path, python: str, venv: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([str(tools_venv(venv)), "environment", "--output-reproducible",
                    "--output-format", "JSON", "--output-file", str(out), python], check=True)
    print(f"{out}: CycloneDX SBOM of {python}'s environment")


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def _epoch() -> int:
    if "SOURCE_DATE_EPOCH" in os.environ:
        return int(os.environ["SOURCE_DATE_EPOCH"])
    done = subprocess.run(["git", "log", "-1", "--format=%ct"], cwd=ROOT, capture_output=True,
                          text=True)
    return int(done.stdout.strip()) if done.returncode == 0 else 315532800


def attach(wheel: Path, sbom: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        members = {i.filename: (i, zf.read(i)) for i in zf.infolist()}
    (record,) = [n for n in members if n.endswith(".dist-info/RECORD")]
    name = record.rsplit("/", 1)[0] + "/sboms/fedgate.cdx.json"
    data = sbom.read_bytes()
    lines = [ln for ln in members[record][1].decode().splitlines()
             if ln and not ln.startswith(name + ",")]
    lines.insert(len(lines) - 1, _record_line(name, data))  # RECORD's own line stays last
    stamp = time.gmtime(max(_epoch(), 315532800))[:6]  # zip dates start in 1980
    contents = {n: d for n, (_, d) in members.items()}
    contents[name], contents[record] = data, ("\n".join(lines) + "\n").encode()
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for member in sorted(contents, key=lambda n: (n == record, n)):  # RECORD last
            info = zipfile.ZipInfo(member, date_time=stamp)
            info.external_attr = (members[member][0].external_attr if member in members
                                  else 0o644 << 16)
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, contents[member])
    tmp.replace(wheel)
    print(f"{wheel}: {name} added")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    gen = sub.add_parser("generate")
    gen.add_argument("out", type=Path)
    gen.add_argument("--python", default=sys.executable)
    gen.add_argument("--tools-venv", type=Path, default=ROOT / ".venv-sbom")
    att = sub.add_parser("attach")
    att.add_argument("wheel", type=Path)
    att.add_argument("sbom", type=Path)
    args = parser.parse_args(argv)
    if args.cmd == "generate":
        generate(args.out, args.python, args.tools_venv)
    else:
        attach(args.wheel, args.sbom)
    return 0


if __name__ == "__main__":
    sys.exit(main())
