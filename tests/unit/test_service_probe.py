"""The service probe without nodes: windows from fixed times, the probe against HTTP servers on loopback,
the service step, the service-moved condition, the expectation and the report's lanes and text timeline."""

from __future__ import annotations

import http.server
import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from lab.scenarios.service_probe import (Request, ServiceProbe, Window, serving_periods, summarize,
                                         unavailability_windows)

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- windows from fixed times


def every(start: float, stop: float, step: float = 0.1) -> list[float]:
    return [round(start + i * step, 3) for i in range(int(round((stop - start) / step)) + 1)]


def test_steady_answers_make_no_window():
    assert unavailability_windows(every(0.0, 10.0), 0.0, 10.0) == []


def test_a_silence_longer_than_the_minimum_is_one_window_from_last_answer_to_first_after():
    answered = every(0.0, 3.0) + every(4.2, 10.0)
    failed = [3.3, 3.8, 4.1, 5.0]  # 5.0: a failure while another replica answered is no outage
    assert unavailability_windows(answered, 0.0, 10.0, failed=failed) == [Window(3.0, 4.2, failed=3)]


def test_a_short_silence_is_not_a_window_and_the_minimum_is_configurable():
    answered = every(0.0, 3.0) + every(3.4, 10.0)
    assert unavailability_windows(answered, 0.0, 10.0) == []
    assert unavailability_windows(answered, 0.0, 10.0, min_gap=0.3) == [Window(3.0, 3.4)]


def test_silence_at_the_edges_counts_and_one_reaching_the_end_is_open():
    windows = unavailability_windows(every(2.0, 5.0), 0.0, 10.0)
    assert windows == [Window(0.0, 2.0), Window(5.0, 10.0, open=True)]
    assert [w.duration for w in windows] == [2.0, 5.0]
    assert windows[1].to_json() == {"start_s": 5.0, "end_s": 10.0, "duration_s": 5.0, "observed_s": 5.0,
                                    "unobserved_s": 0.0, "failed_requests": 0, "open": True}


def test_no_answer_at_all_is_one_open_window_over_the_whole_span():
    assert unavailability_windows([], 1.0, 4.0, failed=[1.5, 2.5]) == [Window(1.0, 4.0, failed=2, open=True)]


def test_answers_outside_the_span_are_ignored():
    assert unavailability_windows([-1.0, 0.0, 0.1, 9.9, 10.0, 11.0] + every(0.2, 9.8), 0.0, 10.0) == []


def test_serving_periods_merge_answers_closer_than_the_minimum():
    assert serving_periods([0.1, 0.2, 0.3, 2.0, 2.1, 2.5]) == [(0.1, 0.3), (2.0, 2.5)]
    assert serving_periods([]) == []


def test_summarize_two_replicas_one_moving():
    """node-1 dies at 3 s (node-2 still answers); node-2's replica stops at 8 s and starts on node-3,
    which answers from 8.9 s: one window, 8.0 to 8.9 s."""
    requests = ([Request("node-1", t - 0.01, t, True, "200") for t in every(0.0, 3.0)]
                + [Request("node-1", t - 0.5, t, False, "timeout") for t in every(3.5, 10.0, 0.5)]
                + [Request("node-2", t - 0.01, t, True, "200") for t in every(0.0, 8.0)]
                + [Request("node-2", t - 0.01, t, False, "no connection") for t in every(8.5, 10.0, 0.5)]
                + [Request("node-3", t - 0.01, t, t >= 8.9, "200" if t >= 8.9 else "no connection")
                   for t in every(0.0, 10.0)])
    measured = summarize(requests, 0.0, 10.0)
    # Inside the window: node-1's timeout at 8.5, node-2's refusal at 8.5, node-3's at 8.1 ... 8.8.
    assert measured["windows"] == [{"start_s": 8.0, "end_s": 8.9, "duration_s": 0.9, "observed_s": 0.9,
                                    "unobserved_s": 0.0, "failed_requests": 10, "open": False}]
    assert measured["longest_s"] == 0.9
    assert measured["serving"] == {"node-1": [[0.0, 3.0]], "node-2": [[0.0, 8.0]], "node-3": [[8.9, 10.0]]}
    assert measured["requests"] == len(requests)
    json.dumps(measured)  # result.json takes it as it is


# ---------------------------------------------------------------- the probe, on loopback


class Replica:
    """A tiny HTTP server on a loopback address, stoppable: a replica the probe can lose."""

    def __init__(self, address: str, port: int = 0) -> None:
        handler = type("Handler", (http.server.BaseHTTPRequestHandler,), {
            "do_GET": lambda self: (self.send_response(200), self.end_headers(), self.wfile.write(b"ok")),
            "log_message": lambda self, *args: None})
        self.server = http.server.ThreadingHTTPServer((address, port), handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_the_probe_polls_every_node_and_measures_the_silence_when_every_replica_is_gone():
    first = Replica("127.0.0.1")
    try:
        second = Replica("127.0.0.2", first.port)
    except OSError:
        first.stop()
        pytest.skip("127.0.0.2 is not usable on this host")
    t0 = time.monotonic()
    probe = ServiceProbe("web", {"node-1": "127.0.0.1", "node-2": "127.0.0.2", "node-3": "127.0.0.3"},
                         first.port, "/", lambda: time.monotonic() - t0, interval=0.05, timeout=0.3)
    probe.start()
    try:
        deadline = time.monotonic() + 5
        while probe.serving() != {"node-1", "node-2"} and time.monotonic() < deadline:
            time.sleep(0.02)
        assert probe.serving() == {"node-1", "node-2"}
        probe.measure_from(probe.clock())
        first.stop()  # one replica gone: still available
        time.sleep(0.4)
        second.stop()  # both gone: a window that stays open
        time.sleep(0.8)
        assert probe.serving(within=0.3) == set()
    finally:
        measured = probe.stop()
    assert not probe.running
    outcomes = {r.outcome for r in probe.snapshot()}
    assert "200" in outcomes and "no connection" in outcomes
    assert len(measured["windows"]) == 1 and measured["windows"][0]["open"]
    assert 0.7 <= measured["longest_s"] <= 1.5
    assert set(measured["serving"]) == {"node-1", "node-2", "node-3"} and measured["serving"]["node-3"] == []


# ---------------------------------------------------------------- the step, the condition, the expectation


def test_the_service_steps_parse_describe_themselves_and_are_checked(tmp_path):
    from lab.scenarios.model import ScenarioError, parse

    (tmp_path / "scenario.yaml").write_text(
        "steps:\n  - service: {start: web, port: 8080, replicas: 2}\n"
        "  - wait-until: {condition: service-moved, timeout: 60}\n  - service: stop\n"
        "expect:\n  service_max_unavailable_s: 1.5\n")
    spec = parse(tmp_path / "scenario.yaml")
    assert [s.describe() for s in spec.steps] == ["service: probe web on :8080/ (2 replica(s))",
                                                  "wait until service-moved", "service: stop probing"]
    assert spec.expect.service_max_unavailable_s == 1.5
    for bad, where in (("service: {start: web}", "steps[0].service"), ("service: halt", "steps[0].service"),
                       ("service: {start: web, port: 70000}", "steps[0].service"),
                       ("service: {start: 'a b', port: 80}", "steps[0].service")):
        (tmp_path / "scenario.yaml").write_text(f"steps:\n  - {bad}\n")
        with pytest.raises(ScenarioError) as raised:
            parse(tmp_path / "scenario.yaml")
        assert where in raised.value.message, raised.value.message


def test_the_container_service_scenario_parses_and_starts_its_instances_from_the_template():
    from lab.cluster.units import unit_source
    from lab.scenarios.model import parse

    directory = REPO / "scenarios" / "container-service"
    spec = parse(directory / "scenario.yaml")
    started = [s.unit.start for s in spec.steps if s.unit is not None and s.unit.start]
    assert started == ["web@1.service", "web@2.service"]
    assert all(unit_source(directory / name) == directory / "web@.service" for name in started)
    template = (directory / "web@.service").read_text()
    assert "ExecStartPre=-/usr/bin/docker rm -f" in template and "Conflicts=web@*" in template
    assert spec.expect.service_max_unavailable_s is not None


def test_an_instance_is_submitted_with_its_templates_text(tmp_path):
    from lab.cluster.units import set_desired, unit_source
    from lab.node import layout

    (tmp_path / "web@.service").write_text("[Service]\nExecStart=/bin/true %i\n[X-Fleet]\nConflicts=web@*\n")
    stored: dict[str, str] = {}
    client = SimpleNamespace(put=stored.__setitem__)
    assert set_desired(client, [str(tmp_path / "web@2.service")], "launched") == ["web@2.service"]
    record = json.loads(stored[f"{layout.UNITS}web@2.service"])
    assert record["name"] == "web@2.service" and "%i" in record["text"] and record["desired"] == "launched"
    assert unit_source(tmp_path / "other@1.service") is None and unit_source(tmp_path / "web@.service") is not None


class FakeProbe:
    """What service-moved reads of a probe: who served at an instant."""

    def __init__(self, timeline: dict[float, set[str]]) -> None:
        self.timeline = timeline
        self.running = True
        self.now = 0.0

    def serving(self, within: float = 1.0, at: float | None = None) -> set[str]:
        at = self.now if at is None else at
        return self.timeline[max(t for t in self.timeline if t <= at)]


def conditions_with(probe, last_fault_at: float = 10.0):
    from lab.scenarios.conditions import Conditions

    faults = SimpleNamespace(last={"requested": last_fault_at, "start": last_fault_at})
    conditions = Conditions(None, [], None, faults, lambda timeout, connect_timeout=None: None, lambda: probe.now, {})
    conditions.service = probe
    return conditions


def test_service_moved_waits_until_as_many_replicas_answer_from_other_nodes():
    probe = FakeProbe({0.0: {"node-1", "node-2"}, 11.0: {"node-2"}, 16.0: {"node-2", "node-3"}})
    conditions = conditions_with(probe)
    for now, reached in ((10.5, None), (12.0, None), (16.5, True)):
        probe.now = now
        assert conditions.reached("service-moved", 10.0) is reached


def test_a_service_moved_wait_says_where_and_how_long_after_the_fault():
    from lab.scenarios.model import WaitUntil

    probe = FakeProbe({0.0: {"node-1", "node-2"}, 11.0: {"node-2"}, 16.0: {"node-2", "node-3"}})
    probe.now = 17.0
    conditions = conditions_with(probe)
    ok, detail, measured = conditions.wait(WaitUntil(condition="service-moved", timeout=1))
    assert ok and detail == "answering on node-2, node-3 7.0 s after the fault"
    assert measured == {"service_moved_s": 7.0, "serving": ["node-2", "node-3"]}
    assert conditions.measurements["service_moved_s"] == [7.0]


def test_service_moved_without_a_probe_is_an_error():
    from lab.errors import LabError

    conditions = conditions_with(FakeProbe({0.0: set()}))
    conditions.service = None
    with pytest.raises(LabError, match="needs a probed service"):
        conditions.reached("service-moved", 0.0)


def expectation_run(measured):
    return SimpleNamespace(measurements={"service": measured} if measured else {})


def test_the_expectation_passes_within_the_bound_and_names_every_window():
    from lab.scenarios.expectations import service_expectation

    # Silent from 3 to 4 s and from 9 s to the end while the probe kept asking.
    measured = summarize([Request("node-1", t, t, True, "200") for t in every(0.0, 3.0) + every(4.0, 9.0)]
                         + [Request("node-1", t, t + 0.05, False, "no connection")
                            for t in every(3.05, 3.85) + every(9.05, 9.95)], 0.0, 10.0)
    description, ok, detail = service_expectation(expectation_run(measured), 1.5)
    assert ok and "1.5 s" in description
    assert "1.00 s at 3.00 s" in detail and "1.00 s at 9.00 s (still down at the end)" in detail
    assert not service_expectation(expectation_run(measured), 0.5)[1]
    assert not service_expectation(expectation_run(None), 1.0)[1]


# ---------------------------------------------------------------- the report


def test_the_report_puts_etcds_windows_next_to_the_services_in_json_text_and_svg(tmp_path):
    import xml.etree.ElementTree as ET

    from lab.scenarios.report import result_json, summary_markdown, text_timeline, timeline_svg, unavailability_lanes
    from lab.scenarios.results import RunResult

    # Acknowledged writes every 50 ms but none from 4.0 to 5.5 s (a leader election); a read in the gap.
    ops = [{"kind": "unique", "invoke": t - 0.01, "complete": t, "status": "ok"}
           for t in every(0.05, 4.0, 0.05) + every(5.5, 12.0, 0.05)]
    ops.append({"kind": "read", "invoke": 4.5, "complete": 4.6, "status": "ok"})
    ops.append({"kind": "write", "invoke": 4.2, "complete": None, "status": "unknown"})
    service = {"name": "web", **summarize([Request("node-2", t, t, True, "200") for t in every(1.0, 7.0)]
                                          + [Request("node-3", t, t, True, "200") for t in every(8.0, 11.0)],
                                          1.0, 11.0)}
    lanes = unavailability_lanes(ops, service)
    assert lanes["etcd_writes"]["windows"] == [{"start_s": 4.0, "end_s": 5.5, "duration_s": 1.5, "observed_s": 1.5,
                                                "unobserved_s": 0.0, "failed_requests": 1, "open": False}]
    # The probe sent nothing from 7 to 8 s in this record: that second is unobserved.
    assert lanes["service"]["windows"] == [{"start_s": 7.0, "end_s": 8.0, "duration_s": 1.0, "observed_s": 0.1,
                                            "unobserved_s": 0.9, "failed_requests": 0, "open": False}]
    assert unavailability_lanes([], None) == {}

    faults = [{"start": 3.9, "end": 6.0, "action": "kill", "targets": ["node-1"]}]
    lines = text_timeline(faults, lanes, service["serving"], width=60, rolls=[(9.0, 10.0)])
    rows = {line.split("|")[0].strip(): line.split("|")[1] for line in lines if "|" in line}
    assert set(rows) == {"faults", "etcd writes", "service", "node-2", "node-3"}
    assert all(len(cells) == 60 for cells in rows.values())
    step = 12.0 / 60
    assert rows["etcd writes"].index("#") == int(4.0 / step) and rows["etcd writes"].count("#") >= 7
    assert rows["service"].index("#") == int(7.0 / step) and rows["faults"].index("K") == int(3.9 / step)
    assert rows["node-3"].index("=") == int(8.0 / step) and rows["node-2"].rstrip().endswith("=")
    assert rows["faults"].index("R") == int(9.0 / step)

    result = RunResult("container-service", tmp_path, True, [], {"service": service, "unavailability": lanes,
                                                                 "service_moved_s": [8.2]}, faults, [])
    summary = summary_markdown(result)
    assert "| 8.2 s |" in summary and "| longest time no replica of web answered | 1.00 s (1 window(s)) |" in summary
    assert "| etcd writes | 0.0-12.0 s | 4.00-5.50 s (1.50 s) | 1.50 s |" in summary
    assert "| service | 1.0-11.0 s | 7.00-8.00 s (1.00 s) | 1.00 s |" in summary
    assert "service.jsonl" in summary
    assert result_json(result)["measurements"]["unavailability"] == lanes
    svg = timeline_svg(ops, faults, [], lanes=lanes)
    ET.fromstring(svg)
    assert "etcd writes" in svg and "<title>1.50 s</title>" in svg


def test_the_engines_service_steps_wait_for_the_replicas_then_measure_and_keep_every_request(tmp_path):
    from lab.errors import LabError
    from lab.scenarios.engine import ScenarioRun
    from lab.scenarios.model import ServiceStart

    replica = Replica("127.0.0.1")
    t0 = time.monotonic()
    run = ScenarioRun.__new__(ScenarioRun)
    run.context = SimpleNamespace(addresses={"node-1": "127.0.0.1"}, jump=None)
    run.conditions = SimpleNamespace(service=None)
    run.clock = lambda: time.monotonic() - t0
    run.measurements = {}
    run.run_dir = tmp_path
    try:
        with pytest.raises(LabError, match="no service is being probed"):
            run._service("stop")
        ok, detail, measured = run._service(ServiceStart(start="web", port=replica.port, within=5))
        assert ok and detail.startswith("answering on node-1") and measured == {"serving": ["node-1"]}
        with pytest.raises(LabError, match="already being probed"):
            run._service(ServiceStart(start="web", port=replica.port))
        time.sleep(0.3)
    finally:
        ok, detail, _ = run._service("stop")
        replica.stop()
    assert ok and "unavailable (no replica answered for > 0.5 s): none" in detail
    service = run.measurements["service"]
    assert service["name"] == "web" and service["windows"] == [] and service["answered"] >= 2
    assert len((tmp_path / "service.jsonl").read_text().splitlines()) == service["requests"]


def test_a_service_whose_replicas_never_answer_fails_its_start_step(tmp_path):
    from lab.scenarios.engine import ScenarioRun
    from lab.scenarios.model import ServiceStart

    free = Replica("127.0.0.1")
    port = free.port
    free.stop()  # nothing listens there now
    run = ScenarioRun.__new__(ScenarioRun)
    run.context = SimpleNamespace(addresses={"node-1": "127.0.0.1"}, jump=None)
    run.conditions = SimpleNamespace(service=None)
    run.clock = time.monotonic
    run.measurements = {}
    run.run_dir = tmp_path
    ok, detail, _ = run._service(ServiceStart(start="web", port=port, within=0.3))
    run._service("stop")
    assert not ok and "answering on no node" in detail and "expected 1 replica(s) within 0.3 s" in detail


def test_silence_the_probe_did_not_ask_about_is_unobserved_and_not_judged():
    from lab.scenarios.service_probe import Request, summarize

    # Two nodes polled every 0.1 s; at 5.0 the host stalls for 3 s (no request sent), then all is well.
    requests = [Request(node, t, t + 0.01, True, "200") for node in ("node-1", "node-2")
                for t in [round(i * 0.1, 2) for i in range(50)] + [round(8.0 + i * 0.1, 2) for i in range(20)]]
    measured = summarize(requests, 0.0, 10.0)
    [window] = measured["windows"]
    assert window["duration_s"] > 2.9
    assert window["unobserved_s"] > 2.7 and measured["longest_observed_s"] < 0.3
    # A silent service while the probe keeps asking is observed in full.
    failing = [Request("node-1", round(5.0 + i * 0.1, 2), round(5.0 + i * 0.1, 2) + 0.01, False, "no connection")
               for i in range(30)]
    measured = summarize(requests + failing, 0.0, 10.0)
    assert measured["longest_observed_s"] > 2.7
