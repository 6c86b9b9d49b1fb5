"""An HTTP proxy for apt, on a lab bridge's host address, that forwards only to this machine's Debian mirror.

Tests of `provider: hosts` make plain Debian machines (nspawn nodes of a
lab made outside the lab under test) that install etcd, python3 and nftables
from their own apt sources, as any Debian host does. Lab nodes have no route
off their subnet; this proxy is the one way out, and only to the mirror the
machine's own apt sources name: the hosts' apt is pointed at it with
`Acquire::http::Proxy`, exactly as a site's hosts would be pointed at its
proxy. Anything else is refused (403), and every request is counted.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

FORWARDED_HEADERS = ("content-type", "content-length", "last-modified", "etag", "date")


class AptProxy:
    def __init__(self, address: str, mirror: str) -> None:
        import httpx

        self.allowed_host = urlsplit(mirror).hostname
        self.requests: list[tuple[str, int]] = []
        self.refused: list[str] = []
        self._client = httpx.Client(timeout=60, follow_redirects=True)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
                pass

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                proxy.forward(self, head=False)

            def do_HEAD(self) -> None:  # noqa: N802
                proxy.forward(self, head=True)

        self._server = ThreadingHTTPServer((address, 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self._server.server_address[0]}:{self.port}"

    def __enter__(self) -> "AptProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._client.close()

    def forward(self, handler: BaseHTTPRequestHandler, head: bool) -> None:
        import httpx

        target = urlsplit(handler.path)
        if target.scheme != "http" or target.hostname != self.allowed_host:
            self.refused.append(handler.path)
            handler.send_error(403, f"only {self.allowed_host} is reachable through this proxy")
            return
        headers = {k: v for k, v in handler.headers.items() if k.lower() in ("if-modified-since", "range")}
        try:
            with self._client.stream("HEAD" if head else "GET", handler.path, headers=headers) as response:
                self.requests.append((handler.path, response.status_code))
                handler.send_response(response.status_code)
                for name in FORWARDED_HEADERS:
                    if name in response.headers and not (name == "content-length" and "content-encoding" in response.headers):
                        handler.send_header(name, response.headers[name])
                body = b"" if head else response.read()
                if "content-length" not in response.headers or "content-encoding" in response.headers:
                    handler.send_header("content-length", str(len(body)))
                handler.end_headers()
                handler.wfile.write(body)
        except httpx.HTTPError as exc:
            self.requests.append((handler.path, 502))
            handler.send_error(502, f"the mirror did not answer: {exc}")
