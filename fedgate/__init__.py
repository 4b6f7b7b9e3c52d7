"""The front door: the `fedgate` command, `bootstrap`, `demo` and the dev PKI. It composes
gateway/ (the server) and emitter/ (the client); neither of those imports this package."""
