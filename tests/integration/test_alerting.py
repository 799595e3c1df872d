"""The exported Prometheus rules and Alertmanager configuration, judged by the real tools from Debian's packages:
`promtool check rules`, `promtool test rules` with series that must page and must not (a rollout in progress, a
version that runs no more, a burn too slow for a page), and `amtool check-config` / `amtool config routes test`."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

from amiforge.lifecycle.alerting import alertmanager_config, prometheus_rules, unreachable_pages
from amiforge.lifecycle.export import Exported, to_yaml
from amiforge.policy.document import parse_policy
from amiforge.policy.slos import ImageSlos
from tests.conftest import required_or_skip

WEB = {"image": "web", "version": "web@2", "target": "local:web"}
API = {"image": "api", "version": "api@7", "target": "aws:eu-west-1/api"}


def _tool(name: str) -> str:
    path = shutil.which(name)
    package = "prometheus" if name == "promtool" else "prometheus-alertmanager"
    required_or_skip(path is not None, f"{name} is missing", f"scripts/bootstrap.sh --test (apt-get install {package})")
    assert path is not None
    return path


def _slos(tmp_path: Path) -> ImageSlos:
    text = "channels: {dev: {}}\nslos:\n  images:\n    web: {time_to_ready: {under: 42s}}\n"
    return parse_policy(text, tmp_path / "policy.yaml").slos


def _run(argv: list[str], cwd: Path) -> str:
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def _series(
    labels: dict[str, str], values: str, name: str = "amiforge_boot_attempts_total", **extra: str
) -> dict[str, str]:
    every = {**labels, **extra}
    text = ",".join(f'{k}="{v}"' for k, v in every.items())
    return {"series": f"{name}{{{text}}}", "values": values}


def _boots(labels: dict[str, str], *, ready: str, failed: str = "0x240", timeout: str = "0x240",
           within: str | None = None, instances: str = "3x240",
           rollout: str = "0x240") -> list[dict[str, str]]:  # fmt: skip
    """One version on one target over 4 h at 1-minute steps: counters per outcome, its histogram bucket at the
    threshold, its instances and its target's rollout gauge."""
    return [
        _series(labels, ready, outcome="ready"),
        _series(labels, failed, outcome="failed"),
        _series(labels, timeout, outcome="timeout"),
        # the bucket at the image's own threshold (web: 42 s; every other image: the default 120 s)
        _series(
            labels,
            within if within is not None else ready,
            "amiforge_time_to_ready_seconds_bucket",
            le="42.0" if labels["image"] == "web" else "120.0",
        ),
        _series(labels, instances, "amiforge_instances"),
        _series({"image": labels["image"], "target": labels["target"]}, rollout, "amiforge_rollout_in_progress"),
    ]


def _alert(name: str, labels: dict[str, str], severity: str, slo: str, value: str, what: str) -> dict[str, Any]:
    windows = "14.4x over 1h and 5m or 6x over 6h and 30m" if severity == "page" else "1x over 3d and 6h"
    return {
        "exp_labels": {**labels, "severity": severity, "slo": slo},
        "exp_annotations": {
            "summary": f"{labels['version']} on {labels['target']} burns its {slo} error budget ({windows})",
            "description": f"{value} of launches over the long window were {what}; `amiforge metrics --version "
                           f"{labels['version']}` shows the objective and budget left.",
            "runbook": f"amiforge incident {labels['version']}; amiforge rollback {labels['target']}",
        },
    }  # fmt: skip


def test_promtool_checks_the_exported_rules(tmp_path: Path) -> None:
    promtool = _tool("promtool")
    (tmp_path / "rules.yml").write_text(Exported("prometheus-rules", prometheus_rules(_slos(tmp_path))).yaml())
    assert "SUCCESS" in _run([promtool, "check", "rules", "rules.yml"], tmp_path)


def test_burns_page_and_expected_churn_does_not(tmp_path: Path) -> None:
    promtool = _tool("promtool")
    (tmp_path / "rules.yml").write_text(to_yaml(prometheus_rules(_slos(tmp_path))))
    rolling = {**WEB, "target": "local:canary"}
    gone = {**WEB, "target": "local:gone"}
    slow_api = {**API}
    trickle = {**WEB, "target": "local:trickle"}
    slow_web = {**WEB, "target": "local:slow"}
    series = [
        # web@2 on local:web: half its launches fail → the boot-failure page (and the ticket, which Alertmanager's
        # inhibit rule silences); its ready boots are within 42 s, but the failed half was not ready in time either.
        *_boots(WEB, ready="0+1x240", failed="0+1x240"),
        # The same burn on a target with a rollout in progress: the rollout's gates judge it, no alert.
        *_boots(rolling, ready="0+1x240", failed="0+1x240", rollout="1x240"),
        # The same burn by a version that runs there no more (rolled back): no alert.
        *_boots(gone, ready="0+1x240", failed="0+1x240", instances="0x240"),
        # api@7: every launch ready, none within 120 s (the default threshold) → the slow-boot page.
        *_boots(slow_api, ready="0+1x240", within="0x240"),
        # 1 failure in 200 launches: 5× web's 0.1 % budget — a ticket, never a page (under 14.4× and 6×).
        *_boots(trickle, ready="0+199x240", failed="0+1x240"),
        # web@2 on local:slow: ready, but none within web's 42 s (they are within 120 s): web's own threshold pages.
        *_boots(slow_web, ready="0+1x240", within="0x240"),
        # …and the other bucket is not read for web: within 120 s says nothing about 42 s.
        _series(slow_web, "0+1x240", "amiforge_time_to_ready_seconds_bucket", le="120.0"),
    ]
    failing = "not ready"
    slow = "not ready within the image's time-to-ready threshold"
    tests = {
        "rule_files": ["rules.yml"],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": series,
            "alert_rule_test": [
                {"eval_time": "2h", "alertname": "AmiforgeBootFailureBurnRate", "exp_alerts": [
                    _alert("AmiforgeBootFailureBurnRate", WEB, "page", "boot_success", "0.5000", failing),
                    _alert("AmiforgeBootFailureBurnRate", WEB, "ticket", "boot_success", "0.5000", failing),
                    _alert("AmiforgeBootFailureBurnRate", trickle, "ticket", "boot_success", "0.0050", failing),
                ]},
                {"eval_time": "2h", "alertname": "AmiforgeSlowBootBurnRate", "exp_alerts": [
                    _alert("AmiforgeSlowBootBurnRate", slow_api, "page", "time_to_ready", "1.0000", slow),
                    _alert("AmiforgeSlowBootBurnRate", slow_api, "ticket", "time_to_ready", "1.0000", slow),
                    _alert("AmiforgeSlowBootBurnRate", slow_web, "page", "time_to_ready", "1.0000", slow),
                    _alert("AmiforgeSlowBootBurnRate", slow_web, "ticket", "time_to_ready", "1.0000", slow),
                    # A launch that failed was not ready within 42 s either: web@2's failures burn both SLOs.
                    _alert("AmiforgeSlowBootBurnRate", WEB, "page", "time_to_ready", "0.5000", slow),
                    _alert("AmiforgeSlowBootBurnRate", WEB, "ticket", "time_to_ready", "0.5000", slow),
                ]},
            ],
        }],
    }  # fmt: skip
    (tmp_path / "tests.yml").write_text(to_yaml(tests))
    assert "SUCCESS" in _run([promtool, "test", "rules", "tests.yml"], tmp_path)


def test_a_page_stops_once_the_burn_stops(tmp_path: Path) -> None:
    """Failures for 30 minutes, then none: the 5-minute window clears the page within minutes of the stop, while
    the long windows still remember the burn."""
    promtool = _tool("promtool")
    (tmp_path / "rules.yml").write_text(to_yaml(prometheus_rules(_slos(tmp_path))))
    tests = {
        "rule_files": ["rules.yml"],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": _boots(WEB, ready="0+1x240", failed="0+1x30 30+0x210"),
            "alert_rule_test": [
                {"eval_time": "25m", "alertname": "AmiforgeBootFailureBurnRate", "exp_alerts": [
                    _alert("AmiforgeBootFailureBurnRate", WEB, "page", "boot_success", "0.5000", "not ready"),
                    _alert("AmiforgeBootFailureBurnRate", WEB, "ticket", "boot_success", "0.5000", "not ready"),
                ]},
                {"eval_time": "65m", "alertname": "AmiforgeBootFailureBurnRate", "exp_alerts": [
                    # the page's 5m and 30m windows are clean; the ticket's 6 h window still holds the burn
                    _alert("AmiforgeBootFailureBurnRate", WEB, "ticket", "boot_success", "0.3158", "not ready"),
                ]},
            ],
        }],
    }  # fmt: skip
    (tmp_path / "tests.yml").write_text(to_yaml(tests))
    assert "SUCCESS" in _run([promtool, "test", "rules", "tests.yml"], tmp_path)


def test_loose_objectives_are_said_to_never_page(tmp_path: Path) -> None:
    slos = parse_policy("channels: {dev: {}}\nslos: {default: {boot_success: 90}}\n", tmp_path / "p.yaml").slos
    [note] = unreachable_pages(slos)
    assert "boot_success allows 10.0% bad launches" in note
    assert unreachable_pages(_slos(tmp_path)) == []


def test_amtool_routes_by_owner_and_groups_by_target_and_version(tmp_path: Path) -> None:
    amtool = _tool("amtool")
    config = alertmanager_config({"web": "team-web", "api": "team-web", "db": "dba"}, webhook="http://127.0.0.1:9/x")
    (tmp_path / "alertmanager.yml").write_text(to_yaml(config))
    assert "SUCCESS" in _run([amtool, "check-config", "alertmanager.yml"], tmp_path)
    for labels, receiver in (
        (["image=web", "severity=page"], "team-web-page"),
        (["image=api", "severity=ticket"], "team-web-ticket"),
        (["image=db", "severity=page"], "dba-page"),
        (["image=cache", "severity=page"], "amiforge-default"),  # no owner: the default receiver
    ):
        # --verify.receivers: amtool exits 1 when the labels route anywhere else
        argv = [amtool, "config", "routes", "test", "--config.file=alertmanager.yml", f"--verify.receivers={receiver}"]
        assert receiver in _run([*argv, *labels, "target=local:web", "version=web@2"], tmp_path)
    route = config["route"]
    assert route["group_by"] == ["target", "version"]
    assert config["inhibit_rules"][0]["equal"] == ["image", "version", "target"]
