"""Random secrets that survive being passed on a command line.

``secrets.token_urlsafe`` draws from ``A-Za-z0-9-_``: one token in 64 begins with
``-``, and ``edgefleet serve --admin-token -xyz…`` then reads as an unknown option.
Tokens edgefleet makes never begin with ``-``, so an operator can paste them anywhere.
"""

from __future__ import annotations

import secrets


def random_token(nbytes: int = 32) -> str:
    """A URL-safe token of ``nbytes`` random bytes whose first character is not ``-``."""
    while True:
        token = secrets.token_urlsafe(nbytes)
        if not token.startswith("-"):
            return token
