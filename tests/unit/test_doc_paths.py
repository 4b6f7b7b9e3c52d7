"""Every repository path that README.md and docs/*.md name exists in a fresh clone
(issue 8, point 10: "CONFIG.md points at files that do not exist there").

Collected from the docs, never listed here: backtick spans and link targets that look
like a path (`docs/X.md`, `tests/...py`, `examples/...`; any span with a `/` and a file
extension), bare words that start with one of the repository's top-level directories
(`gateway/http/app.py` in running text) and bare `NAME.md` cross-references. A path is looked
up in `git ls-files` (what a clone gets; the working tree when there is no git), from
the repository root, and for a doc in docs/ also from docs/.

Not repository paths, and allowed by pattern: placeholders for an operator's own
directory (`DIR/gateway.toml`, `CERTS_DIR/ca.key`: an upper-case first segment), the
files `fedgate bootstrap` writes *inside* DIR (`policy/rules.toml`,
`audit/gateway-audit.jsonl`, `keys/…`: taken from fedgate/bootstrap.py, relative to the
config file; any file in those of its directories that hold no code here, such as
`certs/siem-ca.crt`), and the short explicit list OUTSIDE.
"""

from __future__ import annotations

import re
import subprocess
from functools import cache
from pathlib import Path, PurePosixPath

import pytest

from fedgate import bootstrap

ROOT = Path(__file__).resolve().parents[2]
DOCS = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]
OUTSIDE = (
    "../shared/",  # the federation's shared directory, beside the repository (read-only)
    ".venv/",  # made by `make`
)
EXTENSIONS = (".md", ".py", ".toml", ".json", ".jsonl", ".yml", ".yaml", ".txt", ".pem",
              ".crt", ".key", ".db", ".sh")
PATHLIKE = re.compile(r"[A-Za-z0-9_.][\w.\-/]*")


@cache
def tracked() -> frozenset[str]:
    """Files a clone gets (git), else every file under ROOT."""
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True,
                             check=True, timeout=30).stdout.decode()
        files = [f for f in out.split("\0") if f]
    except (OSError, subprocess.SubprocessError):
        files = [p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*") if p.is_file()]
    dirs = {str(parent) for f in files for parent in PurePosixPath(f).parents}
    return frozenset(files) | frozenset(d + "/" for d in dirs if d != ".")


def top_level() -> set[str]:
    return {name.rstrip("/").split("/")[0] for name in tracked()}


def written_by_bootstrap() -> set[str]:
    """What `fedgate bootstrap DIR` writes, relative to DIR (as the configs name them)."""
    base = Path("/DIR")
    paths = {p.relative_to(base).as_posix() for p in bootstrap.generated_files(base)}
    paths |= {bootstrap.RULES, bootstrap.AUDIT, bootstrap.STORE_URL.removeprefix("sqlite:///")}
    return paths | {str(parent) + "/" for p in set(paths) for parent in
                    PurePosixPath(p).parents if str(parent) != "."}


def candidates(text: str) -> set[str]:
    tops = "|".join(re.escape(t) for t in sorted(top_level()) if "." not in t)
    found = set()
    spans = re.findall(r"`([^`\n]+)`", text) + re.findall(r"\]\(([^)\s]+)\)", text)
    for span in spans:
        span = span.split("#", 1)[0].strip()
        if not PATHLIKE.fullmatch(span):
            continue
        first = span.split("/", 1)[0]
        if ("/" in span and (first in top_level() or span.endswith(EXTENSIONS))
                or span.endswith(".md") or span in top_level()):
            found.add(span)
    found |= set(re.findall(rf"(?<![\w/.`-])((?:{tops})/[\w./-]*[\w/])", text))
    found |= set(re.findall(r"(?<![\w/.`-])([A-Z][A-Z_]*\.md)\b", text))
    return found


def bootstrap_dirs() -> set[str]:
    """Directories bootstrap creates that hold no code here (`certs/`, `keys/`, …): any
    file under them is an operator's (`certs/siem-ca.crt`); `audit/` is a package too, so
    only bootstrap's own file there is allowed."""
    code = {f.split("/", 1)[0] for f in tracked() if f.endswith(".py")}
    return {p.split("/", 1)[0] for p in written_by_bootstrap() if "/" in p} - code


def allowed(path: str) -> bool:
    if path.startswith(OUTSIDE):
        return True
    first = path.split("/", 1)[0]
    if "/" in path and re.fullmatch(r"[A-Z][A-Z0-9_]*", first):  # DIR/…, CERTS_DIR/…
        return True
    return path in written_by_bootstrap() or "/" in path and first in bootstrap_dirs()


def exists(path: str, doc: Path) -> bool:
    here = doc.parent.relative_to(ROOT).as_posix()
    options = [path] + ([f"{here}/{path}"] if here != "." else [])
    for option in options:
        norm = str(PurePosixPath(option))
        if norm in tracked() or norm + "/" in tracked():
            return True
    return False


def test_the_collection_finds_paths():
    found = candidates((ROOT / "README.md").read_text(encoding="utf-8"))
    assert {"docs/PROTOCOL.md", "tests/e2e/test_compose.py", "gateway/"} <= found
    assert allowed("DIR/gateway.toml") and allowed("policy/rules.toml")
    assert allowed("certs/siem-ca.crt") and allowed("audit/gateway-audit.jsonl")
    assert not allowed("examples/gateway.toml") and not allowed("audit/nowhere.py")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_path_a_doc_names_exists(doc):
    missing = sorted(path for path in candidates(doc.read_text(encoding="utf-8"))
                     if not allowed(path) and not exists(path, doc))
    assert not missing, (f"{doc.relative_to(ROOT)} names paths a clone does not have "
                         f"(a new file: git add it): {missing}")
