"""Ports for servers the tests start (rendezvous stores, Dask schedulers, S3 servers).

A port that the kernel hands out for outgoing connections (the ephemeral
range, /proc/sys/net/ipv4/ip_local_port_range) is a poor rendezvous port: a
client that retries `connect` to it before the server listens can be given
that same port as its own source port and connect to itself (TCP
simultaneous open), after which client and server wait for each other until
a timeout.  So `free_port` picks a free port below that range.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

LOWEST = 20000


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range of source ports for outgoing connections (Linux's default elsewhere)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now, outside the ephemeral range."""
    low, _ = ephemeral_range()
    candidates = random.sample(range(LOWEST, max(low, LOWEST + 1000)), 200)
    for port in candidates:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in [{LOWEST}, {low}) after {len(candidates)} tries")
