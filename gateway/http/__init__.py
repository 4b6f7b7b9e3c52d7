"""HTTP, TLS and the server: the aiohttp app, sockets, workers, the admin listener, metrics."""
