"""Who a forwarded request is for: the name of the key the client used at the entry node.

The entry node checked the client's key and its model list, then sends the key's NAME (never the
key) in ``X-Sparkd-Key-Name`` with its own peer key. Only a caller authenticated with a key of role
``peer`` may say whose request it carries: from any other caller (a user key, a LAN client without a
key) the header is ignored, and it never reaches an engine or another peer (``engine/outbound.py``
drops it), so nobody can have usage counted to another key's name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from ..config.keys import KEY_NAME, PEER
from ..errors import BadRequest
from ..http.auth import Principal

KEY_NAME_HEADER = "X-Sparkd-Key-Name"
FORWARDED_BY_HEADER = "X-Sparkd-Forwarded-By"
"""The entry node's name for itself (logged by the peer)."""


def on_behalf(principal: Principal, headers: Mapping[str, str]) -> Principal:
    """``principal`` as the key its peer forwards for (``via`` = the peer key's name), or unchanged."""
    if principal.role != PEER:
        return principal
    name = headers.get(KEY_NAME_HEADER)
    if name is None:
        return principal
    if not KEY_NAME.fullmatch(name):
        raise BadRequest(
            f"the {KEY_NAME_HEADER} header must be a key name (letters, digits, '.', '_' or '-', at most 64); "
            "the forwarding sparkd sends it, not a client",
            code="invalid_header",
        )
    return replace(principal, name=name, via=principal.name)


def forwarded_for(principal: Principal, node: str) -> dict[str, str]:
    """The headers a forwarded request carries to the peer."""
    return {KEY_NAME_HEADER: principal.name, FORWARDED_BY_HEADER: node}
