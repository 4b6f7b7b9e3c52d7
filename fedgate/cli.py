"""``fedgate``: the operator interface of PROTOCOL.md §8.

Every subcommand has ``--help``; success exits 0; a failure exits non-zero with one
line on stderr saying why (no traceback for an expected failure). ``fedgate --version``;
a missing command or action (``fedgate``, ``fedgate certs``) is one line plus the usage,
exit 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.version import package_version
from gateway.exits import one_line
from keyring.keys import KeyStatus

from .commands.audit import cmd_audit_rotate, cmd_audit_ship, cmd_audit_verify
from .commands.certs import cmd_certs_init, cmd_certs_issue
from .commands.federation import cmd_bootstrap, cmd_demo
from .commands.keys import cmd_keys_new
from .commands.revoke import cmd_keys_revoke, cmd_keys_revoked
from .commands.selftest import cmd_selftest
from .commands.serve import cmd_probe, cmd_serve


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.run(args) or 0
    except Exception as exc:
        reported = one_line(exc)
        if reported is None:
            raise
        code, line = reported
        _error(line)
        return code
    except KeyboardInterrupt:
        return 130


def _error(line: str) -> None:
    """The one failure line: a JSON log line once `serve --log-format json` set logging up."""
    from gateway import logs

    if logs.is_json():
        logs.get_logger("fedgate").error(line.removeprefix("fedgate: error: "))
    else:
        print(line, file=sys.stderr)


class _Version(argparse.Action):
    """``--version``, looked up only when asked for (start-up stays cheap)."""

    def __init__(self, option_strings: list[str], dest: str, **_: object) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print the version and exit")

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(f"fedgate {package_version()}")
        parser.exit()


def _require(parser: argparse.ArgumentParser, sub: argparse._SubParsersAction,
             what: str) -> None:
    """Without one of ``sub``'s choices: one line naming what is missing, the usage, exit 2
    (a chosen subcommand's own ``run`` default overrides this one)."""
    def missing(args: argparse.Namespace) -> int:
        parser.error(f"missing {what} (one of: {', '.join(sub.choices)})")
        return 2  # pragma: no cover - parser.error exits

    parser.set_defaults(run=missing)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedgate", description="SpectraStrike ⇄ VectorVue federation gateway.")
    parser.add_argument("--version", action=_Version)
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    _require(parser, sub, "command")

    serve = sub.add_parser("serve", help="run the gateway (mTLS, TLS 1.3)",
                           description="Run the gateway from a TOML config (PROTOCOL.md §8).")
    serve.add_argument("--config", required=True, type=Path, help="gateway TOML file")
    serve.add_argument("--workers", type=int, default=1,
                       help="worker processes accepting on the one socket the supervisor "
                       "binds (default 1)")
    serve.add_argument("--log-format", choices=("console", "json"), default=None,
                       help="console: one readable line per record; json: one JSON object "
                       "per line (default: [log] format, else console)")
    serve.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                       default=None, help="lowest level logged; debug adds one line per "
                       "decision (default: [log] level, else info)")
    serve.add_argument("--access-log", action="store_true", default=None,
                       help="one line per HTTP request: method, path, status, duration, "
                       "request id, peer (default: [log] access, else off)")
    serve.set_defaults(run=cmd_serve)

    certs_parser = sub.add_parser("certs", help="dev PKI")
    certs = certs_parser.add_subparsers(metavar="ACTION")
    _require(certs_parser, certs, "action")
    init = certs.add_parser("init", help="create a dev CA, gateway cert and client certs",
                            description="Create a DEV PKI: CA, gateway certificate (SANs "
                            "localhost, 127.0.0.1), one client certificate per identity, and "
                            "their pins (certificate sha256 and spki:<base64>), printed and "
                            "written to pins.json.")
    init.add_argument("dir", type=Path, help="output directory")
    init.add_argument("--identity", action="append", default=None, metavar="NAME",
                      help="client identity (repeatable; default spectrastrike-producer)")
    init.add_argument("--host", action="append", default=None, metavar="HOST",
                      help="gateway SAN (repeatable; default localhost and 127.0.0.1)")
    init.add_argument("--days", type=int, default=30, help="validity in days (default 30)")
    init.add_argument("--force", action="store_true", help="overwrite existing files")
    init.set_defaults(run=cmd_certs_init)
    issue = certs.add_parser("issue", help="issue one more client certificate from an "
                             "existing dev CA",
                             description="Sign a new client certificate for --identity with "
                             "the CA in DIR (ca.crt, ca.key, as 'certs init' wrote them): "
                             "write DIR/NAME.crt and DIR/NAME.key (0600), record its sha256 "
                             "pin in DIR/pins.json, and print its pins as JSON: sha256 (what "
                             "[identities.NAME] pins holds) and spki. An identity already in "
                             "pins.json, or existing NAME.crt/.key, are refused without "
                             "--force.")
    issue.add_argument("dir", type=Path, help="directory holding the CA ('certs init' DIR)")
    issue.add_argument("--identity", required=True, metavar="NAME",
                       help="client identity, ^[A-Za-z0-9._-]{1,128}$")
    issue.add_argument("--days", type=int, default=30,
                       help="validity in days (default 30; never past the CA's)")
    issue.add_argument("--force", action="store_true",
                       help="replace an existing certificate and pin for NAME")
    issue.set_defaults(run=cmd_certs_issue)

    keys_parser = sub.add_parser("keys", help="Ed25519 keys")
    keys = keys_parser.add_subparsers(metavar="ACTION")
    _require(keys_parser, keys, "action")
    new = keys.add_parser("new", help="create an Ed25519 key: PKCS#8 PEM + public JWK",
                          description="Write KID.pem (private, mode 0600) and KID.jwk.json "
                          "(public JWK with fedgate's members) into --out; with --jwks, also "
                          "append the public JWK to that JWKS file (e.g. the gateway's "
                          "producer_keyring; created if missing, replaced atomically, a kid "
                          "already in it is refused before any file is written). The gateway "
                          "reads the keyring at start-up: reload it (SIGHUP) to use the new key.")
    new.add_argument("--kid", required=True, help="key id, ^[A-Za-z0-9._:-]{1,128}$")
    new.add_argument("--out", type=Path, help="output directory (required without --pkcs11)")
    new.add_argument("--identity", help="service identity the key signs for (producer keys)")
    new.add_argument("--tenant", action="append", default=[],
                     help="tenant id the key may sign for (repeatable; producer keys)")
    new.add_argument("--status", choices=[s.value for s in KeyStatus], default="active",
                     help="key status (default active; retired: verify-only)")
    new.add_argument("--not-before", type=int, metavar="UNIX_SECONDS",
                     help="not valid before this time")
    new.add_argument("--not-after", type=int, metavar="UNIX_SECONDS",
                     help="not valid after this time")
    new.add_argument("--jwks", type=Path, metavar="FILE",
                     help="JWKS file to append the public JWK to")
    new.add_argument("--pkcs11", metavar="URI",
                     help="generate the key inside a PKCS#11 token instead, named by an RFC "
                     "7512 URI (pkcs11:token=LABEL;object=LABEL): no PEM is written, the "
                     "private key never leaves the token (docs/KEYS.md)")
    new.add_argument("--module", metavar="SO", help="with --pkcs11: the PKCS#11 library "
                     "(e.g. /usr/lib/softhsm/libsofthsm2.so)")
    new.add_argument("--pin-env", default="FEDGATE_PKCS11_PIN", metavar="NAME",
                     help="with --pkcs11: the environment variable holding the token's user "
                     "PIN (default FEDGATE_PKCS11_PIN)")
    new.set_defaults(run=cmd_keys_new)
    revoke = keys.add_parser(
        "revoke", help="revoke a producer key on every gateway sharing the store (kill switch)",
        description="Mark KID revoked in the store named by the gateway config ([store] url) "
        "and signal it: every gateway sharing that store refuses the key (401 key_not_valid) "
        "within 1 s, and at start-up from then on. Final: there is no un-revoke; give the "
        "producer a new key under a new kid. KID must be in the config's producer_keyring.")
    revoke.add_argument("kid", metavar="KID", help="the producer key's kid")
    revoke.add_argument("--config", required=True, type=Path, help="the gateway's TOML config")
    revoke.add_argument("--reason", default="", help="why (one line, kept with the revocation)")
    revoke.set_defaults(run=cmd_keys_revoke)
    revoked = keys.add_parser("revoked", help="list the revoked producer keys in the store",
                              description="One line per revoked kid: kid, time (UTC), reason.")
    revoked.add_argument("--config", required=True, type=Path,
                         help="the gateway's TOML config")
    revoked.set_defaults(run=cmd_keys_revoked)

    aud_parser = sub.add_parser("audit", help="audit log tools")
    aud = aud_parser.add_subparsers(metavar="ACTION")
    _require(aud_parser, aud, "action")
    verify = aud.add_parser("verify", help="check an audit log's hash chain",
                            description="Exit 0 and print 'FILE: intact: N lines, last hash "
                            "HEX' when the chain is intact (record the last hash elsewhere: "
                            "only a copy of it shows that trailing lines were removed). Exit 1 "
                            "with one line naming the first bad line when the chain is broken; "
                            "exit 2 when the file cannot be read. With signed checkpoints "
                            "(docs/AUDIT.md) it also "
                            "reports how far the log is signed and fails when its tail was cut, "
                            "a rotated file is missing or a checkpoint does not verify.")
    verify.add_argument("file", type=Path, nargs="+",
                        help="audit log (JSON lines); several: rotated files, oldest first")
    verify.add_argument("--checkpoint-key", type=Path, metavar="KEY",
                        help="the audit key's JWKS or PEM public key: check every "
                        "checkpoint's signature")
    verify.add_argument("--checkpoint", type=Path, metavar="SIDECAR",
                        help="the latest checkpoint kept outside the log (default: "
                        "LASTFILE.checkpoint when it exists); the log must reach it")
    verify.set_defaults(run=cmd_audit_verify)
    ship = aud.add_parser("ship", help="forward the audit log to a SIEM (RFC 5424 syslog)",
                          description="Send every audit event, in order, as one RFC 5424 "
                          "message over TCP or TLS to the [audit.syslog] receiver of a gateway "
                          "config; at least once (resends after a failure; drop duplicates by "
                          "event.sequence). Exit 0 when stopped (SIGTERM) or, with --once, "
                          "caught up; 1 when shipping cannot continue (broken chain, replaced "
                          "file, another shipper running); 2 on a config error.")
    ship.add_argument("--config", required=True, type=Path, help="gateway TOML file")
    ship.add_argument("--once", action="store_true",
                      help="exit once every event written so far is delivered")
    ship.add_argument("--progress", type=float, default=10.0, metavar="SECONDS",
                      help="seconds between progress lines (default 10)")
    ship.set_defaults(run=cmd_audit_ship)
    rot = aud.add_parser("rotate", help="move the audit file aside; the chain continues",
                         description="Under the appenders' lock: end the audit file with a "
                         "signed checkpoint (with [audit] checkpoint_key), move it to --to "
                         "(default PATH.YYYYmmddTHHMMSSZ) and start a new file whose first line "
                         "continues the chain. Running gateways follow it. Exit 0 done, 1 "
                         "refused (empty file, target exists), 2 config error.")
    rot.add_argument("--config", required=True, type=Path, help="gateway TOML file")
    rot.add_argument("--to", type=Path, metavar="PATH", help="the old file's new name")
    rot.set_defaults(run=cmd_audit_rotate)

    boot = sub.add_parser("bootstrap", help="lay out a dev federation: PKI, keys, configs",
                          description="Write certs/, keys/, gateway.toml and emitter.toml "
                          "into DIR (DEV material: fresh keys every time). Paths in the two "
                          "configs are relative to DIR. The default policy rules are copied "
                          "to DIR/policy/rules.toml unless that file exists (an operator's "
                          "copy is never overwritten, not even with --force: delete it to "
                          "get the defaults back).")
    boot.add_argument("dir", type=Path)
    boot.add_argument("--force", action="store_true",
                      help="replace the certificates, keys and configs a previous bootstrap "
                      "wrote in DIR (the store and audit log are left alone)")
    boot.add_argument("--store-url", help="store url (default sqlite under DIR/state)")
    boot.add_argument("--host", default="127.0.0.1",
                      help="gateway host name the emitter connects to (default 127.0.0.1)")
    boot.add_argument("--bind", help="address the gateway listens on (default --host)")
    boot.add_argument("--port", type=int, default=8443)
    boot.set_defaults(run=cmd_bootstrap)

    probe = sub.add_parser("probe", help="GET /readyz over mTLS (for healthchecks)",
                           description="Exit 0 when the gateway named by an emitter config "
                           "answers /readyz with 200 over the same pinned mTLS transport as "
                           "'fedgate emit' (CA, client certificate, server_pins); 1 with one "
                           "line naming the reason otherwise (e.g. server_pin_mismatch); 2 "
                           "on a config error.")
    probe.add_argument("--config", required=True, type=Path, help="emitter TOML file")
    probe.add_argument("--timeout", type=float, default=3.0,
                       help="seconds for the whole request (default 3)")
    probe.set_defaults(run=cmd_probe)

    selftest = sub.add_parser(
        "selftest", help="run the start-up known-answer tests, one line each",
        description="Run the known-answer tests the gateway runs at start-up: Ed25519 "
        "sign/verify (RFC 8032 test 1), canonical JSON, a schema KAT, and with --config the "
        "feedback key (signs twice through the file key or the PKCS#11 token and verifies "
        "with libsodium). One line per test ('NAME: ok' or 'NAME: FAIL: why'). Exit 0 when "
        "all pass, 1 when one fails (a missing or locked token too), 2 on a config error.")
    selftest.add_argument("--config", type=Path, help="gateway TOML file: also test its "
                          "feedback key")
    selftest.set_defaults(run=cmd_selftest)

    demo = sub.add_parser("demo", help="the whole flow on this machine (embedded store)",
                          description="Dev PKI and keys in a temporary directory, the gateway "
                          "on SQLite, an emitter campaign (incl. one tampered and one replayed "
                          "request), verified feedback, and a summary. Outputs go to "
                          "OUT/<UTC timestamp>/.")
    demo.add_argument("--out", type=Path, default=Path("local_docs/audit"),
                      help="where the run's audit logs and summary go (default local_docs/audit)")
    demo.set_defaults(run=cmd_demo)
    try:
        from emitter.cli import add_commands
    except ImportError:  # pragma: no cover - the emitter ships in the same distribution
        pass
    else:
        add_commands(sub)
    return parser


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
