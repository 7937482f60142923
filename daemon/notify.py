"""systemd's notify protocol (``Type=notify``): READY=1, STATUS=, STOPPING=1.

A datagram to ``$NOTIFY_SOCKET`` (a path, or an abstract name starting with
``@``); nothing happens without it, so the same daemon runs under systemd,
in a container or in a shell.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(*fields: str) -> bool:
    """Send ``KEY=value`` lines to systemd; False when not under a notify-aware manager."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    message = "\n".join(fields).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message, address)
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", os.environ["NOTIFY_SOCKET"], exc.strerror)
        return False
    return True
