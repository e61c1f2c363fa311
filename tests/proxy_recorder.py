"""A proxy.py plugin for the proxy tests: records what the proxy reads from clients and
resolves `*.test` names to 127.0.0.1, so an API host that is not loopback can be tried."""

from __future__ import annotations

import os

from proxy.http.parser import HttpParser
from proxy.http.proxy import HttpProxyBasePlugin


class RecordingResolver(HttpProxyBasePlugin):
    def resolve_dns(self, host: str, port: int):
        return ("127.0.0.1", None) if host.endswith(".test") else (None, None)

    def handle_client_request(self, request: HttpParser) -> HttpParser:
        # every request the proxy reads in clear: a CONNECT line, or a whole plain-http request
        with open(os.environ["PROXY_RECORD"], "ab") as record:
            record.write(request.build() + b"\n")
        return request
