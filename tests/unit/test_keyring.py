"""keyring: JWKS parsing/saving, key selection (PROTOCOL.md §1, §4 step 5), Ed25519 keys."""

from __future__ import annotations

import base64
import copy
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, load_vectors
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

import keyring
import keyring.ed25519
from keyring.ed25519 import PrivateKey, SelfTestError, self_test
from keyring.keys import (
    Key,
    Keyring,
    KeyringError,
    KeyStatus,
    key_from_jwk,
    load_jwks,
    parse_jwks,
    save_jwks,
)
from keyring.select import KeySelectionError, candidate_keys

TELEMETRY = load_vectors("telemetry_v1.json")
FEEDBACK = load_vectors("feedback_v1.json")
PRODUCER = "spectrastrike-producer"
TENANT_A = "7758e414-233a-5ea0-575b-cf0c26f5259a"
TENANT_B = "3526adb4-6352-d1d7-fa72-23d93cd439b3"


def raw_x(x: str) -> bytes:
    """Independent base64url decode (stdlib) of a JWK ``x``."""
    return base64.urlsafe_b64decode(x + "=" * (-len(x) % 4))


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


# -- the module is ours -----------------------------------------------------------------

def test_keyring_module_is_the_projects_not_pypi() -> None:
    path = Path(keyring.__file__).resolve()
    assert path.is_relative_to(ROOT.resolve()), path
    assert path == (ROOT / "keyring" / "__init__.py").resolve()
    assert hasattr(keyring, "candidate_keys")  # PyPI keyring has get_password, not this


# -- vectors' keyrings ------------------------------------------------------------------

# kid → (status, not_before, not_after, identity, tenants)
TELEMETRY_EXPECTED: dict[str, tuple[KeyStatus, int | None, int | None, str | None, set[str]]] = {
    "ss-a-2026": (KeyStatus.ACTIVE, None, None, PRODUCER, {TENANT_A}),
    "ss-a-2027": (KeyStatus.ACTIVE, 1794996400, None, PRODUCER, {TENANT_A}),
    "ss-a-2025": (KeyStatus.RETIRED, None, 1795086400, PRODUCER, {TENANT_A}),
    "ss-revoked": (KeyStatus.REVOKED, None, None, PRODUCER, {TENANT_A}),
    "ss-b-2026": (KeyStatus.ACTIVE, None, None, PRODUCER, {TENANT_B}),
    "ss-future": (KeyStatus.ACTIVE, 1795003600, None, PRODUCER, {TENANT_A}),
    "ss-other-2026": (KeyStatus.ACTIVE, None, None, "spectrastrike-other", {TENANT_B}),  # v1.1
}
FEEDBACK_EXPECTED = {
    "vv-fb-2026": (KeyStatus.ACTIVE, None, None, None, set()),
    "vv-fb-2027": (KeyStatus.ACTIVE, None, None, None, set()),
}


@pytest.mark.parametrize(
    ("doc", "expected"),
    [(TELEMETRY["keyring"], TELEMETRY_EXPECTED), (FEEDBACK["keyring"], FEEDBACK_EXPECTED)],
    ids=["telemetry_v1", "feedback_v1"],
)
def test_parse_vector_keyrings(doc: dict, expected: dict) -> None:
    ring = parse_jwks(doc)
    assert list(ring) == list(expected)  # keyring order is file order
    assert len(ring) == len(doc["keys"])
    xs = {jwk["kid"]: jwk["x"] for jwk in doc["keys"]}
    for kid, (status, not_before, not_after, identity, tenants) in expected.items():
        key = ring[kid]
        assert key.kid == kid
        assert key.status is status
        assert key.not_before == not_before
        assert key.not_after == not_after
        assert key.identity == identity
        assert key.tenants == frozenset(tenants)
        assert key.public == raw_x(xs[kid])
        assert len(key.public) == 32


def test_parse_jwks_for_identity_in_keyring_order() -> None:
    ring = parse_jwks(TELEMETRY["keyring"])
    assert [k.kid for k in ring.for_identity(PRODUCER)] == [
        kid for kid, exp in TELEMETRY_EXPECTED.items() if exp[3] == PRODUCER]
    assert [k.kid for k in ring.for_identity("spectrastrike-other")] == ["ss-other-2026"]
    assert ring.for_identity("nobody") == ()
    assert parse_jwks(FEEDBACK["keyring"]).for_identity(PRODUCER) == ()


# -- malformed JWKS ---------------------------------------------------------------------

GOOD_X = b64url(bytes(range(32)))
OTHER_X = b64url(bytes(range(32, 64)))


def good_jwk(kid: str = "k-good", x: str = GOOD_X, **extra: Any) -> dict[str, Any]:
    jwk = {"kty": "OKP", "crv": "Ed25519", "x": x, "kid": kid, "alg": "EdDSA",
           "status": "active", "identity": PRODUCER, "tenants": [TENANT_A]}
    jwk.update(extra)
    return jwk


def with_second(**changes: Any) -> dict[str, Any]:
    """A JWKS whose second key (index 1, kid 'k2' unless changed) carries ``changes``."""
    bad = good_jwk("k2", OTHER_X)
    for name, value in changes.items():
        if value is _DROP:
            bad.pop(name, None)
        else:
            bad[name] = value
    return {"keys": [good_jwk(), bad]}


_DROP = object()

# name → (JWKS document, regex the KeyringError message must match: it names the key)
MALFORMED_JWKS: dict[str, tuple[Any, str]] = {
    "duplicate_kid": ({"keys": [good_jwk("dup"), good_jwk("dup", OTHER_X)]}, r"'dup'"),
    "kid_with_space_and_bang": (with_second(kid="bad kid!"), r"#1|'bad kid!'"),
    "kid_129_chars": (with_second(kid="k" * 129), r"#1"),
    "kid_empty": (with_second(kid=""), r"#1"),
    "kid_missing": (with_second(kid=_DROP), r"#1"),
    "kid_not_string": (with_second(kid=7), r"#1"),
    "kty_rsa": (with_second(kty="RSA"), r"'k2'"),
    "kty_missing": (with_second(kty=_DROP), r"'k2'"),
    "crv_x25519": (with_second(crv="X25519"), r"'k2'"),
    "crv_ed448": (with_second(crv="Ed448"), r"'k2'"),
    "x_31_bytes": (with_second(x=b64url(bytes(31))), r"'k2'"),
    "x_33_bytes": (with_second(x=b64url(bytes(33))), r"'k2'"),
    "x_missing": (with_second(x=_DROP), r"'k2'"),
    "x_not_base64url": (with_second(x="not+base64/url=="), r"'k2'"),
    "x_not_string": (with_second(x=12345), r"'k2'"),
    "private_member_d": (with_second(d=b64url(bytes(32))), r"'k2'"),
    "unknown_status": (with_second(status="suspended"), r"'k2'"),
    "status_wrong_case": (with_second(status="Active"), r"'k2'"),
    "negative_not_before": (with_second(not_before=-1), r"'k2'"),
    "bool_not_after": (with_second(not_after=True), r"'k2'"),
    "string_not_after": (with_second(not_after="1795000000"), r"'k2'"),
    "float_not_before": (with_second(not_before=1.5), r"'k2'"),
    "tenants_not_a_list": (with_second(tenants=TENANT_A), r"'k2'"),
    "tenants_with_empty_id": (with_second(tenants=[""]), r"'k2'"),
    "tenants_with_non_string": (with_second(tenants=[1]), r"'k2'"),
    "unknown_member": (with_second(use_for="everything"), r"'k2'"),
    "alg_rs256": (with_second(alg="RS256"), r"'k2'"),
    "identity_malformed": (with_second(identity="not an identity"), r"'k2'"),
    "key_not_an_object": ({"keys": [good_jwk(), ["k2"]]}, r"#1"),
}


@pytest.mark.parametrize(
    ("doc", "names"), list(MALFORMED_JWKS.values()), ids=list(MALFORMED_JWKS)
)
def test_malformed_jwks_is_refused_naming_the_key(doc: Any, names: str) -> None:
    with pytest.raises(KeyringError, match=names):
        parse_jwks(doc)


def test_malformed_table_fixtures_differ_from_a_good_keyring() -> None:
    """Control: the same builder without a defect parses, so each row tests its defect."""
    ring = parse_jwks(with_second())
    assert list(ring) == ["k-good", "k2"]


@pytest.mark.parametrize(
    "doc", [None, [], {}, {"keys": None}, {"keys": {"k": good_jwk()}}, "keys"],
    ids=["null", "list", "no_keys", "keys_null", "keys_object", "string"],
)
def test_not_a_jwks_document(doc: Any) -> None:
    with pytest.raises(KeyringError, match="JWKS"):
        parse_jwks(doc)


def test_key_from_jwk_names_its_index() -> None:
    with pytest.raises(KeyringError, match="#5"):
        key_from_jwk({"kid": "bad kid!"}, 5)


def test_load_jwks_missing_file_names_path(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "keys.jwks"
    with pytest.raises(KeyringError) as exc:
        load_jwks(path)
    assert str(path) in str(exc.value)


def test_load_jwks_non_json_file_names_path(tmp_path: Path) -> None:
    path = tmp_path / "keys.jwks"
    path.write_text("keys: [not json]\n", encoding="utf-8")
    with pytest.raises(KeyringError) as exc:
        load_jwks(path)
    assert str(path) in str(exc.value)


def test_load_jwks_bad_key_names_path_and_kid(tmp_path: Path) -> None:
    path = tmp_path / "keys.jwks"
    path.write_text(json.dumps(with_second(status="suspended")), encoding="utf-8")
    with pytest.raises(KeyringError) as exc:
        load_jwks(path)
    assert str(path) in str(exc.value)
    assert "'k2'" in str(exc.value)


@pytest.mark.parametrize(
    "doc", [TELEMETRY["keyring"], FEEDBACK["keyring"]], ids=["telemetry_v1", "feedback_v1"]
)
def test_save_then_load_round_trip(tmp_path: Path, doc: dict) -> None:
    ring = parse_jwks(doc)
    path = tmp_path / "ring.jwks"
    save_jwks(path, ring)
    again = load_jwks(path)
    assert list(again) == list(ring)
    assert dict(again) == dict(ring)  # frozen dataclasses: field-by-field equality
    assert "\"d\"" not in path.read_text(encoding="utf-8")


# -- candidate_keys ---------------------------------------------------------------------

OTHER_KEY = good_jwk("other-1", OTHER_X, identity="other", tenants=[TENANT_B])
DEAD_KEYS = [
    good_jwk("dead-revoked", b64url(bytes([7]) * 32), identity="dead", status="revoked"),
    good_jwk("dead-expired", b64url(bytes([8]) * 32), identity="dead", status="retired",
             not_after=1794000000),
    good_jwk("dead-future", b64url(bytes([9]) * 32), identity="dead", not_before=1796000000),
]
UNBOUND_KEY = {k: v for k, v in good_jwk("unbound-1").items() if k not in ("identity", "tenants")}

KEYRINGS = {
    "telemetry+other": {"keys": copy.deepcopy(TELEMETRY["keyring"]["keys"])
                        + [OTHER_KEY] + DEAD_KEYS},
    "only_other": {"keys": [OTHER_KEY]},
    "only_unbound": {"keys": [UNBOUND_KEY]},
}

NOW = 1795000000
SS_FUTURE_NB = 1795003600
SS_2027_NB = 1794996400
SS_2025_NA = 1795086400

# name → (keyring, identity, kid, now, expected kids (tuple) or error code (str))
SELECTION: dict[str, tuple[str, str, str | None, int, tuple[str, ...] | str]] = {
    "explicit_active_kid": ("telemetry+other", PRODUCER, "ss-a-2026", NOW, ("ss-a-2026",)),
    "explicit_other_tenant_key": ("telemetry+other", PRODUCER, "ss-b-2026", NOW, ("ss-b-2026",)),
    "explicit_unknown_kid": ("telemetry+other", PRODUCER, "ss-nope", NOW, "unknown_kid"),
    "explicit_kid_of_other_identity": ("telemetry+other", PRODUCER, "other-1", NOW,
                                       "unknown_kid"),
    "other_identity_claims_producer_kid": ("telemetry+other", "other", "ss-a-2026", NOW,
                                           "unknown_kid"),
    "explicit_revoked": ("telemetry+other", PRODUCER, "ss-revoked", NOW, "key_not_valid"),
    "revoked_long_after": ("telemetry+other", PRODUCER, "ss-revoked", 0, "key_not_valid"),
    "future_one_second_early": ("telemetry+other", PRODUCER, "ss-future", SS_FUTURE_NB - 1,
                                "key_not_valid"),
    "future_exactly_at_not_before": ("telemetry+other", PRODUCER, "ss-future", SS_FUTURE_NB,
                                     ("ss-future",)),
    "rotated_one_second_early": ("telemetry+other", PRODUCER, "ss-a-2027", SS_2027_NB - 1,
                                 "key_not_valid"),
    "rotated_exactly_at_not_before": ("telemetry+other", PRODUCER, "ss-a-2027", SS_2027_NB,
                                      ("ss-a-2027",)),
    "retired_inside_window": ("telemetry+other", PRODUCER, "ss-a-2025", NOW, ("ss-a-2025",)),
    "retired_exactly_at_not_after": ("telemetry+other", PRODUCER, "ss-a-2025", SS_2025_NA,
                                     ("ss-a-2025",)),
    "retired_one_second_late": ("telemetry+other", PRODUCER, "ss-a-2025", SS_2025_NA + 1,
                                "key_not_valid"),
    "no_kid_now": ("telemetry+other", PRODUCER, None, NOW,
                   ("ss-a-2026", "ss-a-2027", "ss-a-2025", "ss-b-2026")),
    "no_kid_before_rotation": ("telemetry+other", PRODUCER, None, SS_2027_NB - 1,
                               ("ss-a-2026", "ss-a-2025", "ss-b-2026")),
    "no_kid_future_valid": ("telemetry+other", PRODUCER, None, SS_FUTURE_NB,
                            ("ss-a-2026", "ss-a-2027", "ss-a-2025", "ss-b-2026", "ss-future")),
    "no_kid_retired_expired": ("telemetry+other", PRODUCER, None, SS_2025_NA + 1,
                               ("ss-a-2026", "ss-a-2027", "ss-b-2026", "ss-future")),
    "no_kid_other_identity": ("telemetry+other", "other", None, NOW, ("other-1",)),
    "identity_without_keys": ("telemetry+other", "nobody", None, NOW, "unknown_kid"),
    "identity_without_keys_with_kid": ("telemetry+other", "nobody", "ss-a-2026", NOW,
                                       "unknown_kid"),
    "identity_all_keys_invalid_now": ("telemetry+other", "dead", None, NOW, "key_not_valid"),
    "identity_all_invalid_explicit_kid": ("telemetry+other", "dead", "dead-future", NOW,
                                          "key_not_valid"),
    "single_key_of_other_identity_no_kid": ("only_other", PRODUCER, None, NOW, "unknown_kid"),
    "single_key_of_other_identity_kid": ("only_other", PRODUCER, "other-1", NOW,
                                         "unknown_kid"),
    "single_unbound_key_no_kid": ("only_unbound", PRODUCER, None, NOW, "unknown_kid"),
    "single_unbound_key_kid": ("only_unbound", PRODUCER, "unbound-1", NOW, "unknown_kid"),
}


@pytest.mark.parametrize(
    ("ring_name", "identity", "kid", "now", "expected"),
    list(SELECTION.values()),
    ids=list(SELECTION),
)
def test_candidate_keys(
    ring_name: str, identity: str, kid: str | None, now: int, expected: tuple[str, ...] | str
) -> None:
    ring = parse_jwks(KEYRINGS[ring_name])
    if isinstance(expected, str):
        with pytest.raises(KeySelectionError) as exc:
            candidate_keys(ring, identity, kid, now)
        assert exc.value.code == expected
        return
    keys = candidate_keys(ring, identity, kid, now)
    assert isinstance(keys, tuple)
    assert tuple(k.kid for k in keys) == expected
    for key in keys:
        assert key is ring[key.kid]
        assert key.identity == identity


def test_candidate_keys_error_does_not_reveal_other_identity() -> None:
    """unknown_kid for a kid of another identity is the same answer as a kid nobody has."""
    ring = parse_jwks(KEYRINGS["telemetry+other"])
    with pytest.raises(KeySelectionError) as foreign:
        candidate_keys(ring, PRODUCER, "other-1", NOW)
    with pytest.raises(KeySelectionError) as missing:
        candidate_keys(ring, PRODUCER, "other-2", NOW)
    assert foreign.value.code == missing.value.code == "unknown_kid"
    assert "'other'" not in foreign.value.detail  # the owning identity is not named


# -- Key.valid_at -----------------------------------------------------------------------

WINDOWED = Key(kid="w", public=bytes(32), not_before=10, not_after=20)

VALID_AT: dict[str, tuple[Key, int, bool]] = {
    "before_not_before": (WINDOWED, 9, False),
    "at_not_before": (WINDOWED, 10, True),
    "inside": (WINDOWED, 15, True),
    "at_not_after": (WINDOWED, 20, True),
    "after_not_after": (WINDOWED, 21, False),
    "single_second_window": (Key(kid="s", public=bytes(32), not_before=5, not_after=5), 5, True),
    "single_second_window_after": (Key(kid="s", public=bytes(32), not_before=5, not_after=5),
                                   6, False),
    "no_window_zero": (Key(kid="n", public=bytes(32)), 0, True),
    "no_window_far_future": (Key(kid="n", public=bytes(32)), 2**40, True),
    "retired_inside": (Key(kid="r", public=bytes(32), status=KeyStatus.RETIRED, not_after=20),
                       20, True),
    "retired_after": (Key(kid="r", public=bytes(32), status=KeyStatus.RETIRED, not_after=20),
                      21, False),
    "revoked_inside_window": (Key(kid="x", public=bytes(32), status=KeyStatus.REVOKED,
                                  not_before=10, not_after=20), 15, False),
    "revoked_no_window": (Key(kid="x", public=bytes(32), status=KeyStatus.REVOKED), 0, False),
}


@pytest.mark.parametrize(
    ("key", "now", "expected"), list(VALID_AT.values()), ids=list(VALID_AT)
)
def test_key_valid_at_bounds_inclusive(key: Key, now: int, expected: bool) -> None:
    assert key.valid_at(now) is expected


def test_keyring_refuses_duplicate_kids_directly() -> None:
    with pytest.raises(KeyringError, match="'w'"):
        Keyring([WINDOWED, WINDOWED])


# -- PrivateKey -------------------------------------------------------------------------

SEED = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
RFC8032_PUBLIC = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")


def test_private_key_from_seed_matches_rfc8032() -> None:
    assert PrivateKey(SEED).public == RFC8032_PUBLIC


def test_private_key_pem_round_trip() -> None:
    key = PrivateKey(SEED)
    pem = key.to_pem()
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    again = PrivateKey.from_pem(pem)
    assert again.public == key.public
    assert again.sign(b"message") == key.sign(b"message")
    # independent check: cryptography reads the same key from our PEM
    loaded = serialization.load_pem_private_key(pem, password=None)
    assert isinstance(loaded, ed25519.Ed25519PrivateKey)
    assert loaded.private_bytes_raw() == SEED


def test_private_key_from_pem_written_by_cryptography() -> None:
    secret = ed25519.Ed25519PrivateKey.generate()
    pem = secret.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption())
    key = PrivateKey.from_pem(pem)
    assert key.public == secret.public_key().public_bytes_raw()
    secret.public_key().verify(key.sign(b"hello"), b"hello")  # raises if wrong


def _pem(secret: Any, password: bytes | None = None) -> bytes:
    encryption = (serialization.BestAvailableEncryption(password) if password
                  else serialization.NoEncryption())
    return secret.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.PKCS8, encryption)


@pytest.mark.parametrize(
    "make_pem",
    [
        lambda: _pem(rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        lambda: _pem(ec.generate_private_key(ec.SECP256R1())),
        lambda: _pem(ed25519.Ed25519PrivateKey.generate(), password=b"pw"),
        lambda: b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        lambda: b"not a pem at all",
        lambda: ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
    ],
    ids=["rsa", "ec_p256", "encrypted_ed25519", "garbage_body", "not_pem", "public_key_pem"],
)
def test_private_key_from_pem_refuses_non_ed25519(make_pem: Any) -> None:
    with pytest.raises(ValueError):
        PrivateKey.from_pem(make_pem())


def test_private_key_load_missing_file_names_path(tmp_path: Path) -> None:
    path = tmp_path / "missing.pem"
    with pytest.raises(ValueError) as exc:
        PrivateKey.load(path)
    assert str(path) in str(exc.value)


def test_private_key_load_rsa_file_names_path(tmp_path: Path) -> None:
    path = tmp_path / "rsa.pem"
    path.write_bytes(_pem(rsa.generate_private_key(public_exponent=65537, key_size=2048)))
    with pytest.raises(ValueError) as exc:
        PrivateKey.load(path)
    assert str(path) in str(exc.value)


def test_private_key_load_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    path.write_bytes(PrivateKey(SEED).to_pem())
    assert PrivateKey.load(path).public == RFC8032_PUBLIC


@pytest.mark.parametrize("size", [0, 31, 33, 64])
def test_private_key_seed_must_be_32_bytes(size: int) -> None:
    with pytest.raises(ValueError):
        PrivateKey(bytes(size))


def test_private_key_repr_hides_the_seed() -> None:
    key = PrivateKey(SEED)
    text = repr(key) + str(key)
    for secret in (SEED.hex(), SEED.hex().upper(), SEED.hex()[:16],
                   base64.b64encode(SEED).decode(), b64url(SEED)):
        assert secret not in text
    assert "PrivateKey" in repr(key)


# -- self-test --------------------------------------------------------------------------

def test_self_test_passes() -> None:
    self_test()


def test_self_test_detects_broken_verify_fake_fault(monkeypatch: pytest.MonkeyPatch) -> None:
    """A verifier that accepts everything cannot be produced for real: fake it."""
    monkeypatch.setattr(keyring.ed25519, "verify", lambda public, signature, message: True)
    with pytest.raises(SelfTestError):
        self_test()


def test_self_test_detects_verify_rejecting_everything_fake_fault(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(keyring.ed25519, "verify", lambda public, signature, message: False)
    with pytest.raises(SelfTestError):
        self_test()
