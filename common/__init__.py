"""What the gateway and the emitter both stand on, and nothing of either: TOML config
files and ``ConfigError``, TLS contexts and pins, durable SQLite, the package version.
Imports only the standard library (and ``schemas``/``keyring`` never need it)."""
