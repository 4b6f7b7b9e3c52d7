"""``fedgate demo``: the whole SpectraStrike → gateway → feedback flow on one machine.

A fresh dev PKI and keys in a temporary state directory, the gateway on the embedded
SQLite store (in this process, real mTLS on loopback), the emitter running the shared
campaign, then a short summary. The run's audit logs and summary land in
``local_docs/audit/<UTC timestamp>/``. Ctrl-C stops everything and removes the state.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from audit import verify_file
from gateway.http.server import start_gateway

from .bootstrap import bootstrap


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Progress:
    """One self-rewriting status line on stderr (plain lines when not a terminal)."""

    def __init__(self, total: int) -> None:
        self.total, self.done = total, 0
        self.tty = sys.stderr.isatty()

    def __call__(self, step: str) -> None:
        self.done += 1
        line = f"[{self.done:>2}/{self.total}] {step}"
        if self.tty:
            sys.stderr.write("\r\x1b[K" + line)
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def finish(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


def write_outputs(out_root: Path, report: dict[str, Any], logs: dict[str, Path]) -> Path:
    """Copy the audit logs, check their chains, write summary.json/.md; return the dir."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out, n = Path(out_root) / stamp, 1
    while out.exists():  # two runs in one second keep separate outputs
        out, n = Path(out_root) / f"{stamp}-{n}", n + 1
    out.mkdir(parents=True)
    chains = {}
    for name, path in logs.items():
        if path.exists():
            shutil.copy2(path, out / name)
            result = verify_file(out / name)
            chains[name] = {"ok": result.ok, "lines": result.lines, "reason": result.reason}
    report = {**report, "audit_chains": chains}
    (out / "summary.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out / "summary.md").write_text(render_summary(report), encoding="utf-8")
    return out


def broken_chains(out: Path) -> list[str]:
    """Names of the audit logs whose chain did not verify in a run's outputs."""
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    return [name for name, chain in summary["audit_chains"].items() if not chain["ok"]]


def render_summary(report: dict[str, Any]) -> str:
    lines = ["# fedgate run summary", "", "## Accepted"]
    lines += [f"- {kind}: {n}" for kind, n in sorted(report["accepted"].items())]
    lines += ["", "## Rejected by reason"]
    lines += [f"- {code}: {n}" for code, n in sorted(report["rejected"].items())]
    lines += ["", "## Adjustments applied"]
    for adj in report["adjustments_applied"]:
        lines.append(f"- {adj['action']:<8} {adj['control']:<10} confidence "
                     f"{adj['confidence']:<5} {adj['target_urn']} "
                     f"(attestation {adj['attestation_measurement_hash'][:12]}…)")
    lines.append(f"- applied again on a second query: {report['reapplied_on_second_query']}")
    lines += ["", "## Audit chains"]
    for name, chain in report.get("audit_chains", {}).items():
        state = "intact" if chain["ok"] else f"BROKEN ({chain['reason']})"
        lines.append(f"- {name}: {chain['lines']} events, {state}")
    return "\n".join(lines) + "\n"


async def run_demo(out_root: Path) -> Path:
    from emitter.campaign import EXECUTIONS, run_campaign
    from emitter.client import EmitterClient
    from emitter.settings import load_emitter_settings

    with tempfile.TemporaryDirectory(prefix="fedgate-demo-") as tmp:
        layout = bootstrap(Path(tmp), port=free_port())
        print(f"fedgate demo: dev PKI, keys and configs in {tmp} (removed at the end)",
              file=sys.stderr)
        runner = await start_gateway(layout.gateway_config, echo=False)
        steps = sum(len(ex.events) + 1 for ex in EXECUTIONS) + 4
        progress = Progress(steps)
        try:
            settings = load_emitter_settings(layout.emitter_config)
            async with EmitterClient(settings) as client:
                report = await run_campaign(client, progress)
        finally:
            progress.finish()
            await runner.cleanup()
        logs = {"gateway-audit.jsonl": layout.gateway_audit,
                "emitter-audit.jsonl": settings.state_dir / "emitter-audit.jsonl"}
        out = write_outputs(out_root, report.as_dict(), logs)
    print((out / "summary.md").read_text(encoding="utf-8"))
    print(f"fedgate demo: outputs in {out}", file=sys.stderr)
    return out


def main(out_root: Path) -> int:
    try:
        out = asyncio.run(run_demo(out_root))
    except KeyboardInterrupt:
        print("fedgate demo: interrupted; gateway stopped, state removed", file=sys.stderr)
        return 130
    broken = broken_chains(out)
    if broken:
        print(f"fedgate demo: audit chain broken in {', '.join(broken)}", file=sys.stderr)
        return 1
    return 0
