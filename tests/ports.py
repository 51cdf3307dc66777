"""Ports for the servers the tests start, chosen where the kernel never hands one out on its own."""

from __future__ import annotations

import random
import socket


_CHOICE = random.SystemRandom()
_GIVEN: set[int] = set()  # ports this process handed out: never twice


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port() -> int:
    """A port free on 127.0.0.1 now, between Ray's default worker ports (10002-19999) and the kernel's ephemeral
    range: bind(0) would give one the kernel also gives to outgoing connections, and one of those may take it
    before the server that was told it binds."""
    low, high = 20000, _ephemeral_low()
    # its own generator: a test that seeds `random` must not make two runs hand out the same ports
    for port in _CHOICE.sample(range(low, high), k=min(200, high - low)) if high > low else []:
        if port in _GIVEN:  # told to a server that may not have bound it yet
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        _GIVEN.add(port)
        return port
    with socket.socket() as probe:  # an unusual port range: the kernel's choice
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
