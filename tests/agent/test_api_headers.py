"""The local API's own header reader gives what http.client's parser gives, limits included."""

from __future__ import annotations

import http.client
import io

import pytest

from agent.api.server import MAX_HEADER_LINE, MAX_HEADERS, read_headers

BLOCKS = [
    b"Host: x\r\nContent-Length: 12\r\n\r\n",
    b"Host: x\r\nX-A:  spaced  \r\nX-A: twice\r\n\r\n",  # duplicates, surrounding spaces
    b"Host: x\r\nX-Folded: one\r\n two\r\n\r\n",  # obsolete line folding: the stdlib path
    b"Host: x\nContent-Type: application/x-npy\n\n",  # bare LF line ends
    b"Host: x\r\nX-Empty:\r\nX-Tab:\tv\r\n\r\n",
    b"Host: x\r\nweird name: v\r\n\r\n",  # not a token: the stdlib path
    b"\r\n",
]


@pytest.mark.parametrize("block", BLOCKS)
def test_same_headers_as_http_client(block: bytes) -> None:
    ours = read_headers(io.BytesIO(block))
    theirs = http.client.parse_headers(io.BytesIO(block))
    assert ours.items() == theirs.items()
    assert ours.get_all("X-A") == theirs.get_all("X-A")


def test_limits() -> None:
    with pytest.raises(http.client.LineTooLong):
        read_headers(io.BytesIO(b"X: " + b"a" * MAX_HEADER_LINE + b"\r\n\r\n"))
    many = b"".join(b"X-%d: v\r\n" % i for i in range(MAX_HEADERS + 1)) + b"\r\n"
    with pytest.raises(http.client.HTTPException):
        read_headers(io.BytesIO(many))
