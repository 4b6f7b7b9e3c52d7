"""End-to-end smoke against a RUNNING stack (embedded or Redis), asserting every step.

    python tests/e2e/smoke.py --emitter-config STATE/emitter.toml \
        [--gateway-audit STATE/audit/gateway-audit.jsonl] [--out local_docs/audit]

Runs the shared SpectraStrike campaign (emitter/campaign.py) through the emitter
library: telemetry and graphs from three operators in two tenants, one tampered and one
replayed request, verified feedback per tenant, and a second query that must apply
nothing. Writes the audit logs and a summary to OUT/<UTC timestamp>/ and exits 0 only
if every step passed and every audit chain is intact. Used by docker-compose's emitter
service and by tests/e2e/test_smoke.py.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from emitter.campaign import CampaignError, run_campaign  # noqa: E402
from emitter.client import EmitterClient  # noqa: E402
from emitter.settings import load_emitter_settings  # noqa: E402
from fedgate.demo import broken_chains, write_outputs  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--emitter-config", required=True, type=Path)
    parser.add_argument("--gateway-audit", type=Path,
                        help="the gateway's audit log, copied and chain-checked if readable")
    parser.add_argument("--out", type=Path, default=ROOT / "local_docs" / "audit")
    return parser


async def smoke(args: argparse.Namespace) -> Path:
    settings = load_emitter_settings(args.emitter_config)
    async with EmitterClient(settings) as client:
        await client.flush()  # anything left from an earlier run goes first
        report = await run_campaign(client, lambda step: print(f"ok: {step}", flush=True))
    logs = {"emitter-audit.jsonl": settings.state_dir / "emitter-audit.jsonl"}
    if args.gateway_audit is not None:
        logs["gateway-audit.jsonl"] = args.gateway_audit
    return write_outputs(args.out, report.as_dict(), logs)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = asyncio.run(smoke(args))
    except CampaignError as exc:
        print(f"smoke: FAILED: {exc}", file=sys.stderr)
        return 1
    broken = broken_chains(out)
    if broken:
        print(f"smoke: FAILED: audit chain broken in {', '.join(broken)}", file=sys.stderr)
        return 1
    print(f"smoke: passed; outputs in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
