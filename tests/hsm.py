"""A real SoftHSM2 in a temporary directory: its own softhsm2.conf (tokendir under the
test's directory), tokens made with ``softhsm2-util --init-token``, keys imported or
generated through the project's own PKCS#11 code (keyring/pkcs11.py) in a subprocess
that sees only this SoftHSM2 (``SOFTHSM2_CONF``).

SoftHSM2 reads ``SOFTHSM2_CONF`` and lists its tokens once, when the module is loaded
in a process: the in-process tests share one session-wide SoftHSM2 whose tokens are
all made before any test loads the module (tests/conftest.py ``softhsm``); a test that
needs a token of its own runs the gateway or the CLI as a subprocess with ``env``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULE_CANDIDATES = ("/usr/lib/softhsm/libsofthsm2.so",
                     "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so")
PIN, SO_PIN = "4321-user", "8765-so"
PIN_ENV = "FEDGATE_TEST_PKCS11_PIN"


def module_path() -> Path:
    for candidate in MODULE_CANDIDATES:
        if Path(candidate).is_file():
            return Path(candidate)
    raise RuntimeError("SoftHSM2 is not installed (apt-get install softhsm2; `make testdeps`)")


class SoftHsm:
    def __init__(self, root: Path) -> None:
        if shutil.which("softhsm2-util") is None:
            raise RuntimeError("softhsm2-util not found (apt-get install softhsm2)")
        self.root, self.module = root, module_path()
        self.tokendir = root / "tokens"
        self.tokendir.mkdir(parents=True)
        self.conf = root / "softhsm2.conf"
        self.conf.write_text(f"directories.tokendir = {self.tokendir}\n"
                             "objectstore.backend = file\nlog.level = ERROR\n"
                             "slots.removable = false\n", encoding="utf-8")

    @property
    def env(self) -> dict[str, str]:
        """The environment of a process that uses this SoftHSM2 (the PIN for ``${…}``)."""
        return {**os.environ, "SOFTHSM2_CONF": str(self.conf), PIN_ENV: PIN,
                "PYTHONPATH": str(ROOT)}

    def init_token(self, label: str, pin: str = PIN) -> None:
        subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", label,
                        "--so-pin", SO_PIN, "--pin", pin], env=self.env, check=True,
                       capture_output=True)

    @staticmethod
    def uri(token: str, obj: str) -> str:
        return f"pkcs11:token={token};object={obj}"

    def _keys(self, call: str, uri: str, *args: str) -> bytes:
        """Run keyring.pkcs11's ``generate_key``/``import_seed`` in a fresh process."""
        code = ("import sys; from pathlib import Path; from keyring import pkcs11 as p; "
                "cfg = p.Pkcs11Config(Path(sys.argv[1]), sys.argv[2]); "
                f"out = p.{call}(cfg, p.parse_uri(sys.argv[3]), "
                "*[bytes.fromhex(a) for a in sys.argv[4:]]); print(out.hex())")
        done = subprocess.run([sys.executable, "-c", code, str(self.module), PIN, uri, *args],
                              env=self.env, check=True, capture_output=True, text=True,
                              cwd=ROOT)
        return bytes.fromhex(done.stdout.strip())

    def import_seed(self, token: str, obj: str, seed: bytes) -> bytes:
        return self._keys("import_seed", self.uri(token, obj), seed.hex())

    def generate(self, token: str, obj: str) -> bytes:
        return self._keys("generate_key", self.uri(token, obj))

    def toml(self, pin: str = f"${{{PIN_ENV}}}") -> str:
        """The [pkcs11] table (the PIN through ${ENV} by default)."""
        return f'\n[pkcs11]\nmodule = "{self.module}"\npin = "{pin}"\n'

    def import_mismatched_pair(self, token: str, obj: str, seed: bytes,
                               other_public: bytes) -> None:
        """A token that answers wrongly: the private key object is ``seed``'s, the public
        key object under the same label holds ``other_public`` (a botched import)."""
        code = """if True:
            import sys, pkcs11
            from pkcs11 import Attribute as A, ObjectClass as O, KeyType as K
            lib = pkcs11.lib(sys.argv[1])
            params = bytes.fromhex("06032b6570")
            label = sys.argv[4]
            seed, public = bytes.fromhex(sys.argv[5]), bytes.fromhex(sys.argv[6])
            with lib.get_token(token_label=sys.argv[3]).open(rw=True, user_pin=sys.argv[2]) as s:
                common = {A.TOKEN: True, A.KEY_TYPE: K.EC_EDWARDS, A.EC_PARAMS: params,
                          A.LABEL: label, A.ID: label.encode()}
                s.create_object({**common, A.CLASS: O.PRIVATE_KEY, A.VALUE: seed,
                                 A.SIGN: True, A.SENSITIVE: True, A.PRIVATE: True})
                s.create_object({**common, A.CLASS: O.PUBLIC_KEY, A.VERIFY: True,
                                 A.EC_POINT: bytes([4, 32]) + public})
        """
        subprocess.run([sys.executable, "-c", code, str(self.module), PIN, token, obj,
                        seed.hex(), other_public.hex()], env=self.env, check=True,
                       capture_output=True, cwd=ROOT)
