"""Listening sockets, bound once by the process that owns the port (issue 8.2).

``fedgate serve`` binds here before anything else runs, without ``SO_REUSEPORT``: a
second gateway on a port in use stops at once with one line
(``127.0.0.1:8443 address already in use``) instead of splitting the traffic with the
first. With ``--workers N`` the supervisor binds and hands the sockets to its workers.
"""

from __future__ import annotations

import errno
import ipaddress
import socket


class ListenError(OSError):
    """One line: ``HOST:PORT <reason>`` (the CLI prints it after ``fedgate: error:``)."""

    def __str__(self) -> str:
        return str(self.args[0])


def bind_listeners(host: str, port: int, backlog: int) -> list[socket.socket]:
    """One listening socket per address ``host`` resolves to (as asyncio's
    ``create_server`` would bind), ``SO_REUSEADDR`` only (a TIME_WAIT port is reusable,
    a listening one is not)."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ListenError(f"{where} cannot be resolved ({exc.strerror})") from None
    socks: list[socket.socket] = []
    try:
        for family, kind, proto, _, addr in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:  # as asyncio: v6 sockets do not take v4 too
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(backlog)
            sock.setblocking(False)
    except OSError as exc:
        for sock in socks:
            sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ListenError(f"{where} address already in use") from None
        reason = (exc.strerror or str(exc)).lower()
        raise ListenError(f"{where} cannot listen ({reason})") from None
    return socks


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
