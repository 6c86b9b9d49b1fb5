"""The node's etcd client: the few etcd v3 calls the agents need, over the JSON gateway. Standard library only.

Copied to /var/lib/lab/ on each node with the agents. The gateway's encoding
(keys and values in base64, a prefix read as a key range) is defined here once:
the host's client (lab/cluster/etcdclient.py) uses these functions too.
"""

from __future__ import annotations

import base64
import http.client
import json
import ssl
import urllib.error
import urllib.request


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


class Etcd:
    """The few etcd v3 calls the agents need, over the JSON gateway, with failover."""

    def __init__(self, endpoints: list[str], tls: dict | None, timeout: float = 2.0) -> None:
        self.endpoints = endpoints
        self.timeout = timeout
        self.context = None
        if tls:
            self.context = ssl.create_default_context(cafile=tls["ca"])
            self.context.load_cert_chain(tls["cert"], tls["key"])

    def call(self, path: str, body: dict) -> dict:
        last: Exception | None = None
        for index, endpoint in enumerate(self.endpoints):
            request = urllib.request.Request(f"{endpoint}/v3/{path}", data=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout, context=self.context) as response:
                    data = json.loads(response.read() or b"{}")
                if index:  # remember the endpoint that answered
                    self.endpoints = self.endpoints[index:] + self.endpoints[:index]
                return data
            except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as exc:
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
            request = urllib.request.Request(f"{endpoint}/health")
            with urllib.request.urlopen(request, timeout=self.timeout, context=self.context) as response:
                return json.loads(response.read()).get("health") == "true"
        except Exception:  # noqa: BLE001 - any failure means "not healthy yet"
            return False
