"""The scenario report writers, from fixed results: the SVG timeline and JUnit XML."""

from __future__ import annotations

import xml.etree.ElementTree as ET


def test_timeline_svg_and_junit_from_fixed_results(tmp_path):
    from lab.scenarios.results import RunResult, StepResult
    from lab.scenarios.report import timeline_svg, write_junit

    ops = [{"invoke": i * 0.1, "complete": i * 0.1 + 0.01, "status": "ok" if i % 7 else "unknown"}
           for i in range(100)]
    svg = timeline_svg(ops, [{"start": 2.0, "end": 4.0, "action": "kill", "targets": ["node-1"]}],
                       [{"t": 3.1, "leader": "node-2", "term": 3}])
    root = ET.fromstring(svg)
    assert root.tag.endswith("svg")
    assert "kill node-1" in svg and "node-2 t3" in svg
    result = RunResult("demo", tmp_path, False,
                       [StepResult(0, "fault: kill leader", True, 1.0, 0.2, "node-1"),
                        StepResult(1, "wait until new-leader", False, 1.2, 10.0, "not reached within 10 s")],
                       {}, [], [])
    write_junit(result, tmp_path / "junit.xml")
    suite = ET.parse(tmp_path / "junit.xml").getroot().find("testsuite")
    assert suite.get("failures") == "1" and suite.get("tests") == "2"
    assert "not reached" in suite.find("testcase/failure").get("message")
