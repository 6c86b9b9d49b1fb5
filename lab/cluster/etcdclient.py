"""lab's own etcd client: the v3 JSON gateway over httpx, with endpoint failover.

Why this and not a gRPC library (evaluated for workloads, agents, scenarios):
  * etcd3 (python-etcd3 0.12) is unmaintained since 2020 and pins old
    protobuf/grpc generated code that breaks with current protobuf;
  * aetcd 1.0 is maintained but asyncio-only and brings grpcio (a large
    native wheel) for what lab needs: put/get/delete, compare-and-set, leases,
    status and member management;
  * etcd serves the same v3 API as JSON over HTTP (the gRPC gateway, on the
    client port, stable in 3.4+), and httpx is a well-kept HTTP client with
    keep-alive pools and client-certificate TLS. Every call is one POST that
    a test can read in a packet capture or reproduce with curl.
Keys and values travel base64-encoded, as the gateway requires (the encoding
is lab/node/etcd.py's, shared with the nodes' own client).

Failover: each call goes to the current endpoint; on a connection error or
timeout the client moves on to the next endpoint and retries once per
endpoint. Outcomes are never guessed: a request that may have reached etcd
(timeout after sending) raises `EtcdUnknown`, so a history checker can treat
it as possibly applied.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from lab.errors import LabError
from lab.node.etcd import b64, prefix_end, unb64


class EtcdError(LabError):
    """etcd answered with an error, or no endpoint could be reached."""


class EtcdUnavailable(EtcdError):
    """No endpoint accepted the connection: the request surely did not apply."""


class EtcdUnknown(EtcdError):
    """The request was sent but no answer came: it may or may not have applied."""


@dataclass(frozen=True)
class TlsFiles:
    ca: str
    cert: str
    key: str


@dataclass(frozen=True)
class MemberStatus:
    endpoint: str
    member_id: str
    leader: str
    raft_term: int
    raft_index: int
    db_size: int
    version: str

    @property
    def is_leader(self) -> bool:
        return self.member_id == self.leader


class EtcdClient:
    def __init__(self, endpoints: list[str], tls: TlsFiles | None = None, timeout: float = 2.0,
                 jump: Any = None, connect_timeout: float | None = None) -> None:
        if not endpoints:
            raise ValueError("no etcd endpoints")
        self.endpoints = list(endpoints)
        self.tls = tls
        self.jump = jump  # the SSH jump host the members are reached through (lab.host.reach), or None
        self.timeout = timeout
        # Connecting (with TLS, the handshake) may get longer than an answer: on a starved host a
        # handshake with an emulated node took up to 1.6 s where a status answer took 0.14 s. A
        # client whose every new connection is cut off at the answer's timeout never reconnects.
        self.connect_timeout = timeout if connect_timeout is None else max(timeout, connect_timeout)
        self._current = 0
        self._lock = threading.Lock()
        self._local = threading.local()  # one httpx.Client per thread: they are not shared safely across forks

    @classmethod
    def scheme(cls, tls: bool) -> str:
        return "https" if tls else "http"

    def _client(self):
        client = getattr(self._local, "client", None)
        if client is None:
            from lab.host.reach import http_client

            import httpx

            kwargs: dict[str, Any] = {"timeout": httpx.Timeout(self.timeout, connect=self.connect_timeout)}
            if self.tls is not None:
                import ssl

                context = ssl.create_default_context(cafile=self.tls.ca)
                context.load_cert_chain(self.tls.cert, self.tls.key)
                kwargs["verify"] = context
            client = self._local.client = http_client(self.jump, **kwargs)
        return client

    def close(self) -> None:
        client = getattr(self._local, "client", None)
        if client is not None:
            client.close()
            self._local.client = None

    # ------------------------------------------------------------ transport

    def call(self, path: str, body: dict[str, Any], endpoint: str | None = None) -> dict[str, Any]:
        """POST one gateway call; fail over across endpoints unless one is given."""
        import httpx

        targets = [endpoint] if endpoint else self._rotation()
        last: Exception | None = None
        refused: EtcdError | None = None
        for target in targets:
            try:
                response = self._client().post(f"{target}/v3/{path}", json=body)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                last = exc
                self._advance(target)
                continue
            except httpx.TransportError as exc:
                # Sent, or maybe sent (read/write failures, a reset on a reused
                # connection...): a write's outcome is unknown from here.
                self._advance(target)
                if path in _READ_ONLY and not endpoint:
                    last = exc  # nothing changes by asking again elsewhere
                    continue
                raise EtcdUnknown(f"{target}: no answer to {path} ({type(exc).__name__})") from None
            data = response.json() if response.content else {}
            if response.status_code != 200:
                message = data.get("message") or data.get("error") or response.text
                if _ambiguous(message):
                    self._advance(target)
                    if path in _READ_ONLY and not endpoint:
                        refused = EtcdError(f"{target}: {message}")
                        continue
                    raise EtcdUnknown(f"{target}: {path}: {message}")
                if _retryable(message) and not endpoint:
                    refused = EtcdError(f"{target}: {message}")
                    self._advance(target)
                    continue
                raise EtcdError(f"{target}: {path}: {message}")
            return data
        if refused is not None:
            # Some member answered: say what it said, not that another was down.
            raise EtcdError(f"no etcd member could serve {path}: {refused.message}",
                            hint="check the cluster with `lab status`")
        raise EtcdUnavailable(f"no etcd endpoint answered {path}: {last}",
                              hint="check the cluster with `lab status`")

    def _rotation(self) -> list[str]:
        with self._lock:
            start = self._current
        return self.endpoints[start:] + self.endpoints[:start]

    def _advance(self, failed: str) -> None:
        with self._lock:
            if self.endpoints[self._current] == failed:
                self._current = (self._current + 1) % len(self.endpoints)

    # ------------------------------------------------------------ KV

    def put(self, key: str, value: str, lease: int | None = None) -> int:
        """Store a value; returns the revision of the write."""
        body: dict[str, Any] = {"key": b64(key), "value": b64(value)}
        if lease:
            body["lease"] = str(lease)
        return int(self.call("kv/put", body)["header"]["revision"])

    def get(self, key: str) -> str | None:
        kvs = self.call("kv/range", {"key": b64(key)}).get("kvs") or []
        return unb64(kvs[0].get("value")) if kvs else None

    def get_prefix(self, prefix: str) -> dict[str, str]:
        data = self.call("kv/range", {"key": b64(prefix), "range_end": b64(prefix_end(prefix))})
        return {unb64(kv["key"]): unb64(kv.get("value")) for kv in data.get("kvs") or []}

    def delete(self, key: str) -> int:
        return int(self.call("kv/deleterange", {"key": b64(key)}).get("deleted", 0))

    def compare_and_set(self, key: str, expected: str | None, value: str) -> bool:
        """Set `key` to `value` only if it currently holds `expected` (None: absent)."""
        if expected is None:
            compare = {"key": b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": "0"}
        else:
            compare = {"key": b64(key), "target": "VALUE", "result": "EQUAL", "value": b64(expected)}
        data = self.call("kv/txn", {"compare": [compare],
                                    "success": [{"request_put": {"key": b64(key), "value": b64(value)}}]})
        return bool(data.get("succeeded", False))

    # ------------------------------------------------------------ leases

    def grant(self, ttl: int) -> int:
        return int(self.call("lease/grant", {"TTL": str(ttl)})["ID"])

    def keepalive(self, lease: int) -> int:
        data = self.call("lease/keepalive", {"ID": str(lease)})
        return int(data.get("result", {}).get("TTL", 0))

    def revoke(self, lease: int) -> None:
        self.call("lease/revoke", {"ID": str(lease)})

    # ------------------------------------------------------------ cluster

    def status(self, endpoint: str) -> MemberStatus:
        data = self.call("maintenance/status", {}, endpoint=endpoint)
        return MemberStatus(endpoint=endpoint, member_id=data["header"]["member_id"], leader=data.get("leader", ""),
                            raft_term=int(data.get("raftTerm", 0)), raft_index=int(data.get("raftIndex", 0)),
                            db_size=int(data.get("dbSize", 0)), version=data.get("version", ""))

    def health(self, endpoint: str) -> bool:
        """True when the member answers /health with a leader (what etcdctl endpoint health checks)."""
        import httpx

        try:
            response = self._client().get(f"{endpoint}/health")
            return response.status_code == 200 and response.json().get("health") == "true"
        except (httpx.HTTPError, ValueError):
            return False

    def members(self) -> list[dict[str, Any]]:
        return self.call("cluster/member/list", {}).get("members", [])

    def member_add(self, peer_url: str) -> dict[str, Any]:
        return self.call("cluster/member/add", {"peerURLs": [peer_url]})

    def member_remove(self, member_id: str) -> None:
        self.call("cluster/member/remove", {"ID": member_id})


# Calls that change nothing: safe to send to the next endpoint after a timeout.
_READ_ONLY = frozenset({"kv/range", "maintenance/status", "cluster/member/list"})


def _retryable(message: str) -> bool:
    # Refused before anything was proposed: another member may serve it.
    return any(text in message for text in ("no leader", "not capable", "too many requests", "server stopped",
                                            "unhealthy cluster"))


def _ambiguous(message: str) -> bool:
    # The proposal may have been committed even though this answer says it failed.
    return any(text in message for text in ("request timed out", "leader changed", "timed out due to"))
