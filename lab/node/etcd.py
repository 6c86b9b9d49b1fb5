"""The node's etcd client: the few etcd v3 calls the agents need, over the JSON gateway. Standard library only.

Copied to /var/lib/lab/ on each node with the agents. The gateway's encoding
(keys and values in base64, a prefix read as a key range) is defined here once:
the host's client (lab/cluster/etcdclient.py) uses these functions too.

Connections are kept alive, one per endpoint and thread: on a TLS lab (the
default) a new connection costs a full handshake, and a connection per
request halved the writes/s an agent gets (bench/etcd_tls.py).
"""

from __future__ import annotations

import base64
import http.client
import json
import ssl
import threading
import urllib.parse


def b64(value: str | bytes) -> str:
    """A key or value as the gateway takes it."""
    return base64.b64encode(value.encode() if isinstance(value, str) else value).decode()


def unb64(value: str | None) -> str:
    """A key or value as the gateway returns it (absent: empty)."""
    return base64.b64decode(value or "").decode()


def prefix_end(prefix: str) -> bytes:
    """The range end that makes a range read return every key starting with `prefix`."""
    raw = bytearray(prefix.encode())
    for i in range(len(raw) - 1, -1, -1):
        if raw[i] < 0xFF:
            raw[i] += 1
            return bytes(raw[: i + 1])
    return b"\0"


# A kept-alive connection the member closed while it sat idle (the member
# restarted, say) fails like this on its next request, which then goes again
# on a new connection: as safe as `call` sending it to the next endpoint.
STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)


class Etcd:
    """The few etcd v3 calls the agents need, over the JSON gateway, with failover."""

    def __init__(self, endpoints: list[str], tls: dict | None, timeout: float = 2.0) -> None:
        self.endpoints = endpoints
        self.timeout = timeout
        self.context = None
        if tls:
            # The member's certificate must chain to the lab's CA and name the
            # address dialled; ours (a lab certificate) is what etcd's
            # client-cert-auth asks for.
            self.context = ssl.create_default_context(cafile=tls["ca"])
            self.context.load_cert_chain(tls["cert"], tls["key"])
        self._local = threading.local()

    def _connection(self, endpoint: str) -> http.client.HTTPConnection:
        url = urllib.parse.urlsplit(endpoint)
        if url.scheme == "https":
            return http.client.HTTPSConnection(url.hostname, url.port, timeout=self.timeout, context=self.context)
        return http.client.HTTPConnection(url.hostname, url.port, timeout=self.timeout)

    def request(self, endpoint: str, method: str, path: str, body: bytes | None = None) -> bytes:
        """One request on this thread's connection to `endpoint`; anything but 200 raises (an OSError)."""
        connections = self._local.__dict__.setdefault("connections", {})
        headers = {"Content-Type": "application/json"} if body is not None else {}
        retry_stale = endpoint in connections  # only a reused connection can be stale
        while True:
            connection = connections.get(endpoint) or connections.setdefault(endpoint, self._connection(endpoint))
            try:
                connection.request(method, path, body=body, headers=headers)
                response = connection.getresponse()
                data = response.read()
            except BaseException as exc:
                connection.close()  # a half-used connection is never used again
                connections.pop(endpoint, None)
                if retry_stale and isinstance(exc, STALE):
                    retry_stale = False
                    continue
                raise
            if response.status != 200:
                # Not kept for the next request: through a worker's gateway a connection stays with the
                # one member it reached, and a member that answers only errors (cut off from the others)
                # must not keep this client; a new connection goes to the next member.
                connection.close()
                connections.pop(endpoint, None)
                text = data[:200].decode(errors="replace")
                raise ConnectionError(f"{endpoint}{path}: HTTP {response.status}: {text}")
            return data

    def close(self) -> None:
        """Close this thread's connections."""
        for connection in self._local.__dict__.pop("connections", {}).values():
            connection.close()

    def call(self, path: str, body: dict) -> dict:
        last: Exception | None = None
        for index, endpoint in enumerate(self.endpoints):
            try:
                data = json.loads(self.request(endpoint, "POST", f"/v3/{path}", json.dumps(body).encode()) or b"{}")
                if index:  # remember the endpoint that answered
                    self.endpoints = self.endpoints[index:] + self.endpoints[:index]
                return data
            except (OSError, ValueError, http.client.HTTPException) as exc:
                # HTTPException (IncompleteRead, BadStatusLine...) is not an
                # OSError: a member dying mid-answer must not kill the agent.
                last = exc
        raise ConnectionError(f"no etcd endpoint answered {path}: {last}")

    def get_prefix(self, prefix: str) -> dict[str, str]:
        data = self.call("kv/range", {"key": b64(prefix), "range_end": b64(prefix_end(prefix))})
        return {unb64(kv["key"]): unb64(kv.get("value")) for kv in data.get("kvs") or []}

    def get(self, key: str) -> str | None:
        kvs = self.call("kv/range", {"key": b64(key)}).get("kvs") or []
        return unb64(kvs[0].get("value")) if kvs else None

    def put(self, key: str, value: str, lease: str | None = None) -> None:
        body = {"key": b64(key), "value": b64(value)}
        if lease:
            body["lease"] = lease
        self.call("kv/put", body)

    def delete(self, key: str) -> None:
        self.call("kv/deleterange", {"key": b64(key)})

    def create_if_absent(self, key: str, value: str, lease: str) -> bool:
        data = self.call("kv/txn", {
            "compare": [{"key": b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": "0"}],
            "success": [{"request_put": {"key": b64(key), "value": b64(value), "lease": lease}}]})
        return bool(data.get("succeeded"))

    def grant(self, ttl: int) -> str:
        return str(self.call("lease/grant", {"TTL": str(ttl)})["ID"])

    def keepalive(self, lease: str) -> int:
        return int((self.call("lease/keepalive", {"ID": lease}).get("result") or {}).get("TTL", 0))

    def revoke(self, lease: str) -> None:
        self.call("lease/revoke", {"ID": lease})

    def healthy(self, endpoint: str) -> bool:
        """True when the member at `endpoint` answers /health with a leader."""
        try:
            return json.loads(self.request(endpoint, "GET", "/health")).get("health") == "true"
        except Exception:  # noqa: BLE001 - any failure means "not healthy yet"
            return False
