"""The hub token for gated repositories: a root-only file, checked like sparkd's other secrets."""

from __future__ import annotations

from ..private_files import PrivateFileError, read_private_file


class TokenFileError(Exception):
    """The token file exists but cannot be used; the message says why (never its content)."""


def read_token(path: str) -> str | None:
    """The token in ``path``; None when there is no such file (public repositories need none)."""
    if not path:
        return None
    try:
        text = read_private_file(path).decode("utf-8", errors="replace").strip()
    except FileNotFoundError:
        return None
    except PrivateFileError as error:
        raise TokenFileError(f"the hub token file {path} cannot be used: {error}") from None
    return text or None
