"""A stand-in server for the process handling of benchmarks/load.py: answers /health on its config's port, forever;
and a stand-in client that starts one, says the process ids and waits."""

from __future__ import annotations

import http.server
import os
import time
import types


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def serve_health(config) -> None:
    http.server.HTTPServer(("127.0.0.1", config.port), _Health).serve_forever()


def start_and_wait() -> None:
    """What `load.run_policy` does first, in the process `load.in_fresh_process` gives it: start a server."""
    import load
    from core.distributed import free_port

    server = load.start_server(types.SimpleNamespace(port=free_port(), policy="stub"), timeout=60, target=serve_health)
    print(os.getpid(), server.pid, flush=True)
    time.sleep(120)
