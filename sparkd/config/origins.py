"""What a ``server.cors_origins`` pattern may look like (``http/cors.py`` matches origins against them)."""

from __future__ import annotations


def pattern_error(pattern: str) -> str | None:
    """Why ``pattern`` is not a usable origin pattern, or None."""
    if pattern == "*":
        return None
    if not pattern or any(c.isspace() for c in pattern):
        return "empty or holds whitespace"
    scheme, sep, rest = pattern.partition("://")
    if not sep or not scheme or not rest:
        return "expected scheme://host[:port]"
    if "/" in rest:
        return "an origin has no path"
    return None
