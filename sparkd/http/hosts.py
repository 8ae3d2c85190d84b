"""Whether a ``Host`` header names this machine by address: the guard against DNS rebinding.

A hostile web page can make its own DNS name resolve to this machine. The
browser then counts sparkd as that page's own origin: it sends no ``Origin`` on
a GET or an EventSource and lets the page read the answers, but ``Host`` still
carries the page's name. An IP address or ``localhost`` in ``Host`` cannot be
such a name, since no DNS answer is involved in reaching it.
"""

from __future__ import annotations

import ipaddress


def is_address_host(host: str) -> bool:
    """``host`` (a ``Host`` header: name or address, optional port) is an IP address or ``localhost``."""
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    name = name.strip("[]")
    if name == "localhost":
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True
