"""A stand-in server for the process handling of benchmarks/load.py: answers /health on its config's port, forever."""

from __future__ import annotations

import http.server


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def serve_health(config) -> None:
    http.server.HTTPServer(("127.0.0.1", config.port), _Health).serve_forever()
