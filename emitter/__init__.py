"""SpectraStrike side: sign and send telemetry, query and verify feedback (PROTOCOL.md §3, §6)."""
