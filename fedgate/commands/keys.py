"""`fedgate keys new`: an Ed25519 key (PKCS#8 PEM + public JWK), optionally added to a JWKS;
with ``--pkcs11 URI`` the key pair is generated inside a PKCS#11 token instead (docs/KEYS.md)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from keyring.ed25519 import PrivateKey
from keyring.keys import KID_RE, Key, KeyStatus, add_to_jwks, key_from_jwk, load_jwks


def cmd_keys_new(args: argparse.Namespace) -> int:
    if getattr(args, "pkcs11", None) is not None:
        return cmd_keys_new_pkcs11(args)
    if args.out is None:
        raise ValueError("--out is required (or --pkcs11 URI: the key is made in a token)")
    _check_new_args(args)  # refuse before writing anything
    pem, jwk = args.out / f"{args.kid}.pem", args.out / f"{args.kid}.jwk.json"
    for path in (pem, jwk):
        if path.exists():
            raise ValueError(f"{path} exists; refusing to overwrite a key")
    key = PrivateKey(os.urandom(32))
    public = _new_public(args, key.public)
    args.out.mkdir(parents=True, exist_ok=True)
    fd = os.open(pem, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key.to_pem())
    jwk.write_text(json.dumps(public.to_jwk(), indent=2) + "\n", encoding="utf-8")
    if args.jwks is not None:
        add_to_jwks(args.jwks, public)
        print(f"fedgate: added {args.kid} to {args.jwks}", file=sys.stderr)
    print(json.dumps(public.to_jwk()))
    return 0


def cmd_keys_new_pkcs11(args: argparse.Namespace) -> int:
    """``keys new --pkcs11 URI --module SO [--pin-env NAME]``: generate the pair inside the
    token (CKA_EXTRACTABLE false: the private key never leaves it), print the public JWK;
    --out writes only KID.jwk.json, --jwks appends it. The PIN comes from the environment
    variable --pin-env names, never from the command line."""
    from pathlib import Path

    from keyring.pkcs11 import generate_key
    from keyring.pkcs11_uri import Pkcs11Config, parse_uri

    _check_new_args(args)
    uri = parse_uri(args.pkcs11)
    if args.module is None:
        raise ValueError("--module is required with --pkcs11 (the PKCS#11 library)")
    pin = os.environ.get(args.pin_env)
    if not pin:
        raise ValueError(f"environment variable {args.pin_env} (the token's user PIN) is "
                         "not set")
    jwk_path = args.out / f"{args.kid}.jwk.json" if args.out is not None else None
    if jwk_path is not None and jwk_path.exists():
        raise ValueError(f"{jwk_path} exists; refusing to overwrite a key")
    public = _new_public(args, bytes(32))  # the members' checks, before the token is touched
    key = dataclasses.replace(public, public=generate_key(Pkcs11Config(Path(args.module),
                                                                       pin), uri))
    if jwk_path is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        jwk_path.write_text(json.dumps(key.to_jwk(), indent=2) + "\n", encoding="utf-8")
    if args.jwks is not None:
        add_to_jwks(args.jwks, key)
        print(f"fedgate: added {args.kid} to {args.jwks}", file=sys.stderr)
    print(f"fedgate: generated {args.kid} in {uri} (the private key stays in the token)",
          file=sys.stderr)
    print(json.dumps(key.to_jwk()))
    return 0


def _check_new_args(args: argparse.Namespace) -> None:
    if not KID_RE.fullmatch(args.kid):
        raise ValueError(f"--kid {args.kid!r} must match ^[A-Za-z0-9._:-]{{1,128}}$")
    for flag, value in (("--not-before", args.not_before), ("--not-after", args.not_after)):
        if value is not None and value < 0:
            raise ValueError(f"{flag} must be Unix seconds (>= 0), got {value}")
    if None not in (args.not_before, args.not_after) and args.not_after < args.not_before:
        raise ValueError("--not-after is before --not-before")
    if args.jwks is not None:
        if not args.jwks.parent.is_dir():
            raise ValueError(f"--jwks {args.jwks}: no such directory {args.jwks.parent}")
        if args.jwks.exists() and args.kid in load_jwks(args.jwks):
            raise ValueError(f"{args.jwks}: kid {args.kid!r} is already in this keyring")


def _new_public(args: argparse.Namespace, public: bytes) -> Key:
    key = Key(kid=args.kid, public=public, identity=args.identity,
              tenants=frozenset(args.tenant), status=KeyStatus(args.status),
              not_before=args.not_before, not_after=args.not_after)
    key_from_jwk(key.to_jwk())  # the loader's own checks (identity, tenants)
    return key
