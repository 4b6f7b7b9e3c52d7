"""Feedback-key sign rate: the PEM file key (libsodium) against the same seed inside a
SoftHSM2 token (PKCS#11 CKM_EDDSA through python-pkcs11), in one run.

    .venv/bin/python bench/sign_bench.py [--signs 5000] [--append docs/BENCHMARKS.md]

The token is made in a temporary directory (its own softhsm2.conf, as the tests do).
Each signer signs the same ~300-byte feedback signing input ``--signs`` times, one at a
time in one thread; the token's figure is ``Pkcs11Signer.sign`` (the call the gateway's
one-thread signer executor makes), so it includes python-pkcs11's overhead. Prints signs/s
for each and the ratio; --append adds the section to the benchmarks file.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from hsm import PIN, SoftHsm  # noqa: E402

from keyring.ed25519 import PrivateKey, verify  # noqa: E402
from keyring.signer import FileSigner  # noqa: E402

SEED = bytes.fromhex("8229f12383c61f56c64c8e77f0cddc9dfe00c9f8ae0770e27d36288a79ae7bf3")
MESSAGE = (b"7758e414-233a-5ea0-575b-cf0c26f5259a|1795000000|q-nonce-000000000001._njgMTMDtK"
           b"WXQHpb|feedback.response.v1|vv-fb-2026|" + b"[" + b"{}," * 70 + b"{}]")


def rate(signer, n: int) -> float:
    signer.sign(MESSAGE)  # warm
    t0 = time.perf_counter()
    for _ in range(n):
        signer.sign(MESSAGE)
    return n / (time.perf_counter() - t0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--signs", type=int, default=5000)
    parser.add_argument("--append", type=Path, metavar="MD")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedgate-sign-bench-") as tmp:
        hsm = SoftHsm(Path(tmp))
        hsm.init_token("bench")
        hsm.import_seed("bench", "vv-fb-2026", SEED)
        os.environ["SOFTHSM2_CONF"] = str(hsm.conf)  # before the module is loaded here
        from keyring.pkcs11 import Pkcs11Signer
        from keyring.pkcs11_uri import Pkcs11Config, parse_uri

        token = Pkcs11Signer(Pkcs11Config(hsm.module, PIN),
                             parse_uri(hsm.uri("bench", "vv-fb-2026")), "vv-fb-2026")
        file_key = FileSigner(PrivateKey(SEED), "vv-fb-2026")
        try:
            assert token.sign(MESSAGE) == file_key.sign(MESSAGE)  # same key, same bytes
            assert verify(file_key.public, token.sign(MESSAGE), MESSAGE)
            file_rate, token_rate = rate(file_key, args.signs), rate(token, args.signs)
        finally:
            token.close()
    rows = [("file key (PEM, libsodium)", file_rate), ("SoftHSM2 token (PKCS#11)", token_rate)]
    for name, r in rows:
        print(f"{name}: {r:,.0f} signs/s ({1e6 / r:.0f} µs each)")
    print(f"token / file: {token_rate / file_rate:.3f}")
    if args.append is not None:
        text = [
            "", "## Feedback signing: file key vs PKCS#11 token", "",
            f"`.venv/bin/python bench/sign_bench.py --signs {args.signs}` "
            f"({platform.machine()}, {os.cpu_count()} CPUs, one thread, the same "
            f"{len(MESSAGE)}-byte feedback signing input; SoftHSM2 in a temporary "
            "directory, the vector seed imported; both signers give the same bytes). "
            "One feedback answer is one signature: the token caps a worker at this many "
            "feedback answers per second, and signs in the signer's own thread "
            "(docs/KEYS.md), not on the event loop. Load average when measured: "
            f"{os.getloadavg()[0]:.1f} (the machine is shared: compare the ratio, which "
            "both figures share, rather than the absolute rates).", "",
            "| signer | signs/s | µs each |", "|---|---:|---:|",
            *(f"| {name} | {r:,.0f} | {1e6 / r:.0f} |" for name, r in rows),
            f"| ratio token / file, same run | {token_rate / file_rate:.3f} | |", "",
        ]
        with args.append.open("a", encoding="utf-8") as fh:
            fh.write("\n".join(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
