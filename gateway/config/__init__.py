"""The gateway's configuration: the TOML settings file (PROTOCOL.md §8) and its sections."""
