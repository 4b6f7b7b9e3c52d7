"""Pins computed independently of the code under test (the openssl command line)."""

from __future__ import annotations

import base64
import hashlib
import subprocess
from pathlib import Path


def openssl_spki_pin(cert: Path) -> str:
    """The RFC 7469 / HPKP recipe, by the openssl CLI: an independent computation."""
    pub = subprocess.run(["openssl", "x509", "-in", str(cert), "-pubkey", "-noout"],
                         check=True, capture_output=True).stdout
    spki = subprocess.run(["openssl", "pkey", "-pubin", "-outform", "DER"], input=pub,
                          check=True, capture_output=True).stdout
    return "spki:" + base64.b64encode(hashlib.sha256(spki).digest()).decode()
