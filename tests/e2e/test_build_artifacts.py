"""The build's two promises (issue 12): two wheels built from two fresh clones of the last
commit are byte-identical (tools/reproducible_wheel.py, `make reproducible`), and the SBOM
(tools/sbom.py, `make sbom`) is CycloneDX JSON naming every dependency fedgate declares,
shipped inside the wheel's .dist-info/sboms/ with a RECORD line that matches it. Real
git clones, real pip builds, the real cyclonedx-py (installed from PyPI into its own
venv under the test's directory)."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def declared_dependencies() -> set[str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {re.split(r"[<>=!~ ;\[]", d, maxsplit=1)[0].lower().replace("_", "-")
            for d in deps}


def test_wheel_builds_are_byte_identical():
    done = subprocess.run([sys.executable, "tools/reproducible_wheel.py"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    first, second, verdict = done.stdout.splitlines()
    assert first == second and first.endswith("fedgate-0.1.0-py3-none-any.whl")
    assert verdict.startswith("reproducible: SOURCE_DATE_EPOCH=")


def test_sbom_names_the_dependencies_and_ships_in_the_wheel(tmp_path):
    sbom = tmp_path / "fedgate.cdx.json"
    subprocess.run([sys.executable, "tools/sbom.py", "generate", str(sbom), "--tools-venv",
                    str(tmp_path / "sbom-venv")], cwd=ROOT, check=True, capture_output=True,
                   timeout=600)
    doc = json.loads(sbom.read_text())
    assert doc["bomFormat"] == "CycloneDX" and doc["specVersion"].startswith("1.")
    assert "serialNumber" not in doc  # --output-reproducible
    names = {c["name"].lower().replace("_", "-") for c in doc["components"]}
    assert declared_dependencies() <= names, declared_dependencies() - names
    assert all(c.get("version") for c in doc["components"])
    assert not {"cyclonedx-bom", "cyclonedx-python-lib"} & names  # the generator stays out

    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                    str(tmp_path / "dist"), str(ROOT)], check=True, capture_output=True,
                   timeout=600, cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    subprocess.run([sys.executable, "tools/sbom.py", "attach", str(wheel), str(sbom)],
                   cwd=ROOT, check=True, capture_output=True, env={"SOURCE_DATE_EPOCH":
                                                                   "1700000000"})
    with zipfile.ZipFile(wheel) as zf:
        name = "fedgate-0.1.0.dist-info/sboms/fedgate.cdx.json"
        assert zf.read(name) == sbom.read_bytes()
        names_in_order = zf.namelist()
        assert names_in_order[-1].endswith("RECORD")
        assert names_in_order[:-1] == sorted(names_in_order[:-1])
        record = zf.read(names_in_order[-1]).decode()
        assert zf.testzip() is None
    digest = base64.urlsafe_b64encode(hashlib.sha256(sbom.read_bytes()).digest()).rstrip(
        b"=").decode()
    assert f"{name},sha256={digest},{sbom.stat().st_size}" in record.splitlines()
