"""`amiforge metrics`: M1–M6 of a seeded registry through the CLI, as text and --json, with the policy's SLOs; bad
arguments are exit 2 with the fix."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from amiforge.lifecycle.telemetry import record_boot_test
from amiforge.model import BootObservation, BootReport, Finding, FindingKind, ScanRecord, Severity
from amiforge.scanners.sbom import sbom_digest
from amiforge.store.sql import open_store
from tests.cli_harness import Cli, isolate, make_cli


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Cli:
    data = isolate(tmp_path, monkeypatch)
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "channels: {dev: {}}\nslos:\n  images:\n    web: {boot_success: 99, time_to_ready: {under: 60s}}\n"
    )
    monkeypatch.setenv("AMIFORGE_POLICY", str(policy))
    now = datetime.now(UTC)
    with open_store(f"sqlite:///{data}/registry.db") as store:
        v1 = store.create_version(name="web", recipe_digest="r" * 64, recipe_path="/r.yaml", provider="local",
                                  tags={}, parent=None).id  # fmt: skip
        boots = [BootObservation(f"g-{i}", v1, now - timedelta(hours=2), "ready", 20.0 + i,
                                 now - timedelta(hours=2) + timedelta(seconds=20 + i),
                                 last_heartbeat_at=now - timedelta(seconds=30 if i % 2 else 900))
                 for i in range(9)]  # fmt: skip
        boots.append(BootObservation("g-x", v1, now - timedelta(hours=1), "timeout", ended_at=now - timedelta(hours=1)))
        store.record_boots("aws:eu-west-1/web-asg", boots)
        store.record_boots(
            "boot-test",
            [
                BootObservation(
                    "run-1",
                    v1,
                    now - timedelta(days=3),
                    "ready",
                    15.0,
                    now - timedelta(days=3),
                    now - timedelta(days=3),
                )
            ],
        )
        findings = (Finding(FindingKind.CVE, "TEST-0001", Severity.HIGH, "t", "osv", package="p"),)
        store.add_scan(v1, ScanRecord(now, (), "{}", sbom_digest("{}"), findings, "TEST"))
    return make_cli(monkeypatch, capsys, width=240)


def test_metrics_json_has_m1_to_m6_with_the_policy_slos(cli: Cli) -> None:
    result = cli("metrics", "--json", "--no-collect")
    assert result.code == 0, result.err
    report = result.json()
    [row] = report["targets"]  # the boot test of 3 days ago is outside the 24 h window
    assert (row["version"], row["target"], row["launches"], row["ready"], row["timeout"]) == (
        "web@1", "aws:eu-west-1/web-asg", 10, 9, 1)  # fmt: skip
    assert row["boot_success"] == pytest.approx(0.9)
    assert row["time_to_ready"] == {"p50": 24.0, "p95": 28.0, "p99": 28.0}
    # The group's instances report heartbeats to CloudWatch: 4 of the 10 beat within 3 minutes (the others 15 min
    # ago, or never).
    assert (row["running"], row["heartbeating"], row["coverage"]) == (10, 4, 0.4)
    success, ready = row["slos"]
    assert (success["slo"], success["objective"], success["good"], success["total"]) == ("boot_success", 99.0, 9, 10)
    assert success["budget_left"] == pytest.approx(1 - 0.1 / 0.01) and success["met"] is False
    assert (ready["threshold_seconds"], ready["good"]) == (60.0, 9)
    [vulns] = report["vulnerabilities"]
    assert vulns["by_severity"]["high"] == 1 and vulns["fleet_weighted"]["high"] == 10
    assert report["rollouts"] == [] and report["collected"] == []
    week = cli("metrics", "--json", "--no-collect", "--window", "7d", "--target", "boot-test").json()
    assert [(r["target"], r["launches"]) for r in week["targets"]] == [("boot-test", 1)]


def test_metrics_text_shows_each_sli_and_budget(cli: Cli) -> None:
    result = cli("metrics", "--no-collect", "--version", "web@1")
    assert result.code == 0, result.err
    assert "web@1" in result.out and "aws:eu-west-1/web-asg" in result.out
    assert "90.00% of 10" in result.out and "24.0s/28.0s/28.0s" in result.out and "4/10" in result.out
    assert "boot success 99%: 90.00%, -900% left" in result.out and "ready ≤ 60s 95%" in result.out


def test_metrics_refuses_bad_arguments_with_the_fix(cli: Cli) -> None:
    for argv, expected in ((("--window", "soon"), "--window"), (("--target", "gcp:x"), "local:NAME"),
                           (("--version", "web@9"), "web@9"), (("--target", "local:nope"), "local:nope")):  # fmt: skip
        result = cli("metrics", "--no-collect", *argv)
        assert result.code in (2, 3) and expected in result.err and "Traceback" not in result.err


def test_logs_of_boot_tests_are_json_lines_with_ecs_fields(cli: Cli, tmp_path: Path) -> None:
    data = Path(os.environ["AMIFORGE_DATA_DIR"])
    started = datetime.now(UTC) - timedelta(minutes=5)
    with open_store(f"sqlite:///{data}/registry.db") as store:
        vid = store.get_version("web@1").id
        console = "[    0.000000] Linux version 6.1\r\n\x1b[0;32mhello\x1b[0m\r\nAMIFORGE-READY 9.50\n\nafter\n"
        report = store.add_boot_report(vid, BootReport(9.5, (), console, "tcg", started, 12.0))
        record_boot_test(store, vid, report, "run-TEST")  # as lifecycle/boottest.py does
    result = cli("logs", "--target", "boot-test")
    assert result.code == 0, result.err
    docs = [json.loads(line) for line in result.out.splitlines()]
    assert [d["message"] for d in docs] == ["[    0.000000] Linux version 6.1", "hello", "AMIFORGE-READY 9.50", "after"]
    assert {d["host"]["name"] for d in docs} == {f"report-{report.id}"}
    assert docs[0]["labels"] == {"image": "web", "version": "web@1", "target": "boot-test"}
    assert docs[0]["@timestamp"] == started.isoformat().replace("+00:00", "Z")
    assert datetime.fromisoformat(docs[-1]["@timestamp"]) == started + timedelta(seconds=9.5)
    text = cli("logs", "--target", "boot-test", "--text", "--version", "web@1")
    assert text.code == 0 and text.out.splitlines()[2].endswith(
        f"boot-test report-{report.id} web@1 | AMIFORGE-READY 9.50"
    )
    assert cli("logs", "--since", "1m", "--target", "boot-test").out == ""  # the test was written 5 minutes ago
    bad = cli("logs", "--since", "soon")
    assert bad.code == 2 and "--since" in bad.err
