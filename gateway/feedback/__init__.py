"""Signed policy feedback: the policy engine (rules → adjustments), evidence, the issuer (§6)."""
