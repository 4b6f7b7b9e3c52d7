"""Several PKCS#11 signers of one token in one process, against a real SoftHSM2.

PKCS#11 logs in per application: a second ``C_Login`` answers
``CKR_USER_ALREADY_LOGGED_IN`` and closing a logged-in session logs out every session of
the process. So the signer a SIGHUP reload makes beside the old one could not start
(``cannot log in: UserAlreadyLoggedIn``), and once the old one closed, the new one could
not sign. keyring/pkcs11_session.py keeps one counted login per token instead.
"""

from __future__ import annotations

import pytest
from conftest import FEEDBACK_TOKEN
from hsm import PIN

from keyring.ed25519 import verify
from keyring.pkcs11 import Pkcs11Config, Pkcs11Error, Pkcs11Signer, parse_uri

KID = "vv-fb-2026"


def signer(hsm, pin: str = PIN) -> Pkcs11Signer:
    return Pkcs11Signer(Pkcs11Config(hsm.module, pin), parse_uri(hsm.uri(FEEDBACK_TOKEN, KID)),
                        KID)


def signs(s: Pkcs11Signer) -> bool:
    message = b"feedback signing input"
    return verify(s.public, s.sign(message), message)


def test_a_second_signer_of_the_same_token_opens_and_outlives_the_first(softhsm):
    old = signer(softhsm)
    new = signer(softhsm)  # the reload's replacement, opened while the old one signs
    try:
        assert signs(old) and signs(new)
        old.close()  # the reload retires the old signer: the new one keeps its login
        assert signs(new)
    finally:
        old.close()
        new.close()
    again = signer(softhsm)  # the last one closed logged out: the next logs in afresh
    try:
        assert signs(again)
    finally:
        again.close()


def test_a_wrong_pin_is_refused_when_the_process_holds_no_login(softhsm):
    with pytest.raises(Pkcs11Error, match="cannot log in"):
        signer(softhsm, pin="0000")
    ok = signer(softhsm)  # the failed login left nothing behind
    try:
        assert signs(ok)
    finally:
        ok.close()
