"""A gate in front of a server: the first `budget` requests pass, every later one waits until
the gate opens. A job behind it surely stops mid-way, so a test can kill it there."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

# hop-by-hop, or describing a body this proxy re-frames
_DROPPED = {"connection", "keep-alive", "transfer-encoding", "content-encoding", "content-length",
            "host", "accept-encoding"}


class Gate:
    def __init__(self, upstream: str, budget: int) -> None:
        self.passed = 0
        self.waiting = 0
        self._budget = budget
        self._count = threading.Lock()
        self._open = threading.Event()
        self._http = httpx.Client(base_url=upstream, timeout=60)
        gate = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                gate._admit()
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _DROPPED}
                answer = gate._http.get(self.path, headers=headers)
                self.send_response(answer.status_code)
                for name, value in answer.headers.items():
                    if name.lower() not in _DROPPED:
                        self.send_header(name, value)
                self.send_header("content-length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

            def log_message(self, *args: object) -> None:
                pass

        self._server = _Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def _admit(self) -> None:
        with self._count:
            if self.passed < self._budget:
                self.passed += 1
                return
            self.waiting += 1
        self._open.wait()

    def open(self) -> None:
        """Let every waiting and later request through."""
        self._budget = 1 << 62
        self._open.set()

    def close(self) -> None:
        self.open()
        self._server.shutdown()
        self._server.server_close()
        self._http.close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a held request's client was killed: nobody to answer
