"""The floor of Python's http.server on a Unix socket: read the body, answer 168 bytes.

Run by bench.b_api as a separate process: ``python -m bench.floor_server SOCKET``. What the
agent's API adds on top of this is ours; this much is the stdlib server's.
"""

from __future__ import annotations

import socketserver
import sys
from http.server import BaseHTTPRequestHandler

REPLY = b"\0" * 168


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-npy")
        self.send_header("Content-Length", str(len(REPLY)))
        self.end_headers()
        self.wfile.write(REPLY)


class Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True

    def get_request(self):  # type: ignore[no-untyped-def]
        conn, _ = self.socket.accept()
        return conn, ("unix", 0)


if __name__ == "__main__":
    Server(sys.argv[1], Handler).serve_forever()
