"""A client of a replicated service, from the host: did any replica answer, and when not?

`ServiceProbe` polls `http://NODE_IP:PORT/PATH` on every node of the lab (one
thread per node, every 100 ms, each request bounded by a short timeout) and
records every request: which node, when it was sent and completed (the
scenario's clock), and its outcome. Every node is polled, not only the ones the
scheduler chose: a replica moves, and a node without one refuses the connection
at once, which costs nothing. Nodes are reached on their lab addresses only, and
the HTTP client ignores proxy settings, so no request leaves the lab's subnet.

`unavailability_windows` turns such a record into the periods where the
service was down: from the last answer before a silence longer than
`WINDOW_MIN_S` to the first answer after it. It takes bare times, so etcd's
acknowledged writes go through the same rule, and the report shows the two
side by side.
"""

from __future__ import annotations

import json
import threading
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable

POLL_INTERVAL_S = 0.1
REQUEST_TIMEOUT_S = 0.5
# Silence shorter than this is not a window: one replica polled every 100 ms
# answers every ~0.1 s, and a host thread may stall for a GC or a busy CPU.
# Half a second of no answer from any replica is an outage a user would see.
WINDOW_MIN_S = 0.5
# A node "serves" at an instant if it answered within this long before it.
SERVING_WITHIN_S = 1.0


@dataclass(frozen=True)
class Request:
    node: str
    sent: float  # seconds on the scenario's clock
    done: float
    ok: bool
    outcome: str  # "200", "503", "no connection" (refused, no route), "timeout", "error: ..."


@dataclass(frozen=True)
class Window:
    """A period where nothing answered: from the last answer before it to the first after it."""

    start: float
    end: float
    failed: int = 0  # requests that completed inside it without an answer
    open: bool = False  # nothing answered again before the measurement stopped
    # Of the window, the time nobody asked: the probe's own threads sent no request for longer than
    # two poll intervals (a starved host, not a silent service). Nothing is known of the service then.
    unobserved: float = 0.0

    @property
    def duration(self) -> float:
        return self.end - self.start

    @property
    def observed(self) -> float:
        """The part of the window the probe saw the service silent while it asked."""
        return max(0.0, self.duration - self.unobserved)

    def to_json(self) -> dict:
        return {"start_s": round(self.start, 3), "end_s": round(self.end, 3), "duration_s": round(self.duration, 3),
                "observed_s": round(self.observed, 3), "unobserved_s": round(self.unobserved, 3),
                "failed_requests": self.failed, "open": self.open}


def unavailability_windows(answered: Iterable[float], begin: float, end: float, *, failed: Iterable[float] = (),
                           min_gap: float = WINDOW_MIN_S) -> list[Window]:
    """The periods in [begin, end] longer than `min_gap` with no answer in them.

    `answered` are the times answers arrived (requests that succeeded); a gap
    between two consecutive ones longer than `min_gap` is a window. Before the
    first answer and after the last, `begin` and `end` bound it; a window that
    reaches `end` is open. `failed` are the times requests failed: each window
    counts those inside it (evidence that someone asked, not just silence).
    """
    times = sorted(t for t in answered if begin <= t <= end)
    failed = list(failed)
    edges = [begin] + times + [end]
    windows = []
    for index, (start, stop) in enumerate(zip(edges, edges[1:])):
        if stop - start > min_gap:
            inside = sum(1 for t in failed if start < t < stop)
            windows.append(Window(start, stop, inside, open=index == len(edges) - 2))
    return windows


def unobserved_time(sent: list[float], start: float, end: float, interval: float = POLL_INTERVAL_S) -> float:
    """Within [start, end], the time beyond one poll interval in each stretch longer than two intervals
    where no request was sent (`sent` sorted): how long the host failed to ask at all."""
    edges = [start] + [t for t in sent if start < t < end] + [end]
    return sum((gap - interval for gap in (b - a for a, b in zip(edges, edges[1:])) if gap > 2 * interval), 0.0)


def serving_periods(answered: list[float], *, min_gap: float = WINDOW_MIN_S) -> list[tuple[float, float]]:
    """When one node served: runs of answers with no silence longer than `min_gap` inside."""
    periods: list[tuple[float, float]] = []
    for t in sorted(answered):
        if periods and t - periods[-1][1] <= min_gap:
            periods[-1] = (periods[-1][0], t)
        else:
            periods.append((t, t))
    return periods


def summarize(requests: list[Request], begin: float, end: float) -> dict:
    """The measurements of one probed run: windows, the longest, and when each node served."""
    sent = sorted(r.sent for r in requests)
    windows = [replace(w, unobserved=unobserved_time(sent, w.start, w.end))
               for w in unavailability_windows([r.done for r in requests if r.ok], begin, end,
                                               failed=[r.done for r in requests if not r.ok])]
    nodes = sorted({r.node for r in requests})
    return {
        "begin_s": round(begin, 3), "end_s": round(end, 3), "requests": len(requests),
        "answered": sum(1 for r in requests if r.ok),
        "windows": [w.to_json() for w in windows],
        "longest_s": round(max((w.duration for w in windows), default=0.0), 3),
        # What a verdict may judge: silence the probe saw while it kept asking.
        "longest_observed_s": round(max((w.observed for w in windows), default=0.0), 3),
        "serving": {node: [[round(a, 3), round(b, 3)] for a, b in serving_periods(
            [r.done for r in requests if r.ok and r.node == node])] for node in nodes},
        "window_min_s": WINDOW_MIN_S, "poll_interval_s": POLL_INTERVAL_S,
    }


class ServiceProbe:
    """Polls one HTTP endpoint on every node, from the host, until stopped."""

    def __init__(self, name: str, addresses: dict[str, str], port: int, path: str, clock: Callable[[], float],
                 *, interval: float = POLL_INTERVAL_S, timeout: float = REQUEST_TIMEOUT_S, jump: Any = None) -> None:
        self.name = name
        self.jump = jump  # the SSH jump host the nodes are reached through (lab.host.reach), or None
        self.urls = {node: f"http://{ip}:{port}{path}" for node, ip in sorted(addresses.items())}
        self.clock = clock
        self.interval = interval
        self.timeout = timeout
        self.requests: list[Request] = []
        self.begin = 0.0
        self.end: float | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        self.begin = self.clock()
        for node, url in self.urls.items():
            thread = threading.Thread(target=self._poll, args=(node, url), daemon=True, name=f"service-{node}")
            self._threads.append(thread)
            thread.start()

    def stop(self) -> dict:
        """Stop polling; the run's measurements (see `summarize`)."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self.timeout + 2)
        self.end = self.clock()
        return summarize(self.snapshot(), self.begin, self.end)

    def measure_from(self, at: float) -> None:
        """Count unavailability from `at` on (once the replicas first answered), not from the first request."""
        self.begin = at

    @property
    def running(self) -> bool:
        return bool(self._threads) and not self._stop.is_set()

    def snapshot(self) -> list[Request]:
        with self._lock:
            return list(self.requests)

    def serving(self, within: float = SERVING_WITHIN_S, at: float | None = None) -> set[str]:
        """The nodes that answered within `within` seconds before `at` (now)."""
        at = self.clock() if at is None else at
        return {r.node for r in self.snapshot() if r.ok and at - within <= r.done <= at}

    def write(self, path: Path) -> None:
        """Every request, one JSON object a line (the evidence behind the windows)."""
        path.write_text("".join(json.dumps(asdict(r)) + "\n" for r in self.snapshot()))

    def _poll(self, node: str, url: str) -> None:
        import httpx

        from lab.host.reach import http_client

        # No keep-alive: each request opens its own connection, as a new
        # client would, so a replica that went away is noticed on the next one.
        # (http_client never takes a proxy from the environment: that would send requests out of the lab.)
        with http_client(self.jump, timeout=self.timeout, limits=httpx.Limits(max_keepalive_connections=0)) as client:
            while not self._stop.is_set():
                sent = self.clock()
                try:
                    response = client.get(url)
                    ok, outcome = response.status_code == 200, str(response.status_code)
                except httpx.ConnectError:
                    ok, outcome = False, "no connection"
                except httpx.TimeoutException:
                    ok, outcome = False, "timeout"
                except httpx.HTTPError as exc:
                    ok, outcome = False, f"error: {type(exc).__name__}"
                done = self.clock()
                with self._lock:
                    self.requests.append(Request(node, sent, done, ok, outcome))
                self._stop.wait(max(0.0, self.interval - (done - sent)))
