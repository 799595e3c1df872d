"""Promotion policy: loading with every problem at once, the gate rule by rule, and its properties."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TypedDict, Unpack

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from amiforge.errors import ConfigError, GateFailed
from amiforge.model import Finding, FindingKind, Severity, Status
from amiforge.policy import (
    Candidate,
    ChannelPolicy,
    Policy,
    default_policy,
    evaluate,
    load_policy,
    parse_policy,
    policy_json_schema,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "policy.yaml"
NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def _write(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "policy.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


# ----------------------------------------------------------------------------------------------------------
# Loading

TWO = "channels:\n  dev: {}\n  prod:\n    after: dev\n"  # lines 1-4; a waiver list starts on line 5


def _waiver(**fields: str | None) -> str:
    """TWO plus one waiver (its first key on line 6); a field set to None is left out."""
    spec: dict[str, str | None] = {
        "finding": "TEST-0001",
        "reason": "example",
        "by": "jane.doe@example.invalid",
        "expires": "2027-01-31",
        **fields,
    }
    lines = [f"{k}: {v}" for k, v in spec.items() if v is not None]
    return TWO + "waivers:\n  - " + "\n    ".join(lines) + "\n"


# (id, policy text, expected field, expected 1-based line)
MALFORMED: list[tuple[str, str | bytes, str | None, int | None]] = [
    ("unknown top-level key", "channels:\n  dev: {}\nwaiver: []\n", "waiver", 3),
    ("unknown channel key", "channels:\n  dev:\n    max_severity: high\n", "channels.dev.max_severity", 3),
    ("after names an unknown channel", "channels:\n  dev: {}\n  prod:\n    after: staging\n", "channels.prod.after", 4),
    ("cycle in after", "channels:\n  dev:\n    after: prod\n  prod:\n    after: dev\n", "channels.dev.after", 3),
    ("channel after itself", "channels:\n  dev:\n    after: dev\n", "channels.dev.after", 3),
    ("uppercase channel name", "channels:\n  Dev: {}\n", "channels.Dev", 2),
    ("channel name starting with a digit", "channels:\n  1st: {}\n", 'channels["1st"]', 2),
    ("channel name too long", "channels:\n  " + "a" * 33 + ": {}\n", "channels." + "a" * 33, 2),
    (
        "prod without signatures",
        "channels:\n  prod:\n    require_signature: false\n",
        "channels.prod.require_signature",
        3,
    ),
    (
        "prod-eu without signatures",
        "channels:\n  dev: {}\n  prod-eu:\n    require_signature: false\n",
        "channels.prod-eu.require_signature",
        4,
    ),
    ("unknown severity", "channels:\n  dev:\n    max_cve_severity: severe\n", "channels.dev.max_cve_severity", 3),
    ("bad soak", "channels:\n  dev: {}\n  qa:\n    after: dev\n    min_soak: 1 day\n", "channels.qa.min_soak", 5),
    (
        "soak units out of order",
        "channels:\n  dev: {}\n  qa:\n    after: dev\n    min_soak: 30m1h\n",
        "channels.qa.min_soak",
        5,
    ),
    ("soak without after", "channels:\n  dev:\n    min_soak: 1h\n", "channels.dev.min_soak", 3),
    ("quoted boolean", "channels:\n  dev:\n    require_boot_test: 'no'\n", "channels.dev.require_boot_test", 3),
    ("empty channels", "channels: {}\n", "channels", 1),
    ("no channels", "waivers: []\n", "channels", 1),
    ("duplicate channel", "channels:\n  dev: {}\n  dev: {}\n", "channels.dev", 3),
    ("waiver without reason", _waiver(reason=None), "waivers[0].reason", 6),
    ("waiver without by", _waiver(by=None), "waivers[0].by", 6),
    ("waiver without expires", _waiver(expires=None), "waivers[0].expires", 6),
    ("waiver with an empty reason", _waiver(reason="''"), "waivers[0].reason", 7),
    ("expires unparseable", _waiver(expires="next tuesday"), "waivers[0].expires", 9),
    ("expires an impossible date", _waiver(expires="2027-02-30"), "waivers[0].expires", 9),
    ("expires a number", _waiver(expires="2027"), "waivers[0].expires", 9),
    ("waiver for an unknown channel", _waiver(channels="[dev, qa]"), "waivers[0].channels[1]", 10),
    ("waiver with no channels", _waiver(channels="[]"), "waivers[0].channels", 10),
    ("waiver with package and path", _waiver(package="openssl", path="/etc/x"), "waivers[0].path", 11),
    ("unknown waiver key", _waiver(comment="hi"), "waivers[0].comment", 10),
    ("syntax error", "channels:\n  dev: {after: [\n", None, 3),
    ("not a mapping", "- dev\n- prod\n", None, 1),
    ("empty file", "", None, None),
    ("not UTF-8", b"channels:\n  dev: {}\n\xff\n", None, None),
]


@pytest.mark.parametrize(("text", "field", "line"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_policy_is_one_precise_problem(
    tmp_path: Path, text: str | bytes, field: str | None, line: int | None
) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_policy(path)
    problems = caught.value.problems
    assert len(problems) == 1, [p.render() for p in problems]
    (problem,) = problems
    assert (problem.file, problem.field, problem.line) == (str(path), field, line)
    assert problem.message.strip() and problem.fix and problem.fix.strip()
    assert caught.value.exit_code == 2


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    text = (
        "channels:\n"
        "  dev:\n"
        "    max_cve_severity: severe\n"  # 3: unknown severity
        "  prod:\n"
        "    after: stagin\n"  # 5: unknown channel
        "waivers:\n"
        "  - {finding: TEST-0001, reason: r, by: jane.doe@example.invalid}\n"  # 7: no expires
    )
    with pytest.raises(ConfigError) as caught:
        load_policy(_write(tmp_path, text))
    got = [(p.line, p.field) for p in caught.value.problems]
    assert got == [(3, "channels.dev.max_cve_severity"), (5, "channels.prod.after"), (7, "waivers[0].expires")]
    assert "3 problem(s)" in caught.value.message
    by_field = {p.field: p for p in caught.value.problems}
    assert "unknown < negligible < low < medium < high < critical" in by_field["channels.dev.max_cve_severity"].message


def test_unknown_after_suggests_the_close_channel(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_policy(_write(tmp_path, "channels:\n  staging: {}\n  prod:\n    after: stagin\n"))
    (problem,) = caught.value.problems
    assert "staging" in problem.message and "did you mean 'staging'" in (problem.fix or "")


def test_cycle_names_every_channel_on_it(tmp_path: Path) -> None:
    text = "channels:\n  dev:\n    after: prod\n  staging:\n    after: dev\n  prod:\n    after: staging\n"
    with pytest.raises(ConfigError) as caught:
        load_policy(_write(tmp_path, text))
    (problem,) = caught.value.problems
    assert "dev → prod → staging → dev" in problem.message


def test_missing_policy_says_copy_the_example(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    with pytest.raises(ConfigError) as caught:
        load_policy(path)
    assert str(path) in caught.value.message
    assert caught.value.fix == f"start from the example: cp examples/policy.yaml {path}"
    with pytest.raises(ConfigError):
        load_policy(tmp_path)  # a directory


def test_example_is_the_default_policy_plus_a_waiver() -> None:
    policy = load_policy(EXAMPLE)
    assert policy.channels == default_policy().channels
    assert list(policy.channels) == ["dev", "staging", "prod"]
    assert default_policy().waivers == ()
    (waiver,) = policy.waivers
    assert (waiver.finding, waiver.package, waiver.channels) == ("TEST-0001", "openssl", ("staging", "prod"))
    assert waiver.expires == date(2027, 1, 31)
    assert policy.source == str(EXAMPLE)


def test_defaults_and_a_bare_channel() -> None:
    policy = parse_policy("channels:\n  dev:\n", Path("p.yaml"))
    rule = policy.channel("dev")
    assert rule == ChannelPolicy()
    assert (rule.require_boot_test, rule.require_signature, rule.allow_secrets, rule.fixed_only) == (
        True,
        True,
        False,
        False,
    )
    assert rule.max_cve_severity is Severity.HIGH and rule.after is None and rule.min_soak == timedelta(0)


def test_round_trip_through_json_and_yaml() -> None:
    policy = parse_policy(
        EXAMPLE.read_text()
        + "  - {finding: private-key, path: /root/.ssh/id_rsa, reason: r, by: b,\n"
        + "     expires: '2026-07-01T10:30:00+02:00'}\n",
        Path("p.yaml"),
    )
    dumped = yaml.safe_dump(policy.model_dump(mode="json"))
    again = parse_policy(dumped, Path("again.yaml"))
    assert (again.channels, again.waivers) == (policy.channels, policy.waivers)
    assert again.waivers[1].expires == datetime(2026, 7, 1, 8, 30, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90s", timedelta(seconds=90)),
        ("2m", timedelta(minutes=2)),
        ("1d12h", timedelta(days=1, hours=12)),
        ("1h30m15s", timedelta(hours=1, minutes=30, seconds=15)),
        ("500ms", timedelta(milliseconds=500)),
        ("3600", timedelta(hours=1)),
        ("0s", timedelta(0)),
    ],
)
def test_soak_durations(text: str, expected: timedelta) -> None:
    rule = ChannelPolicy.model_validate({"after": "dev", "min_soak": text})
    assert rule.min_soak == expected
    assert ChannelPolicy.model_validate({"after": "dev", "min_soak": rule.model_dump(mode="json")["min_soak"]}) == rule


def test_json_schema_lists_the_keys() -> None:
    schema = policy_json_schema()
    assert schema["title"] == "amiforge policy"
    properties = schema["properties"]
    assert isinstance(properties, dict)
    assert set(properties) == {"channels", "waivers", "severity_source", "slos", "tags", "retention"}
    assert schema["required"] == ["channels"]
    assert schema["additionalProperties"] is False


def test_a_policy_built_in_code_is_checked_too() -> None:
    with pytest.raises(ValidationError, match="cycle"):
        Policy.model_validate({"channels": {"dev": {"after": "prod"}, "prod": {"after": "dev"}}})
    with pytest.raises(ValidationError, match="must require a signature"):
        Policy(channels={"prod": ChannelPolicy(require_signature=False)})
    with pytest.raises(ValidationError, match="min_soak"):
        ChannelPolicy(min_soak=timedelta(hours=1))


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    st.one_of(
        st.text(max_size=200),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=10) | st.dates(),
            lambda children: (
                st.lists(children, max_size=4)
                | st.dictionaries(
                    st.sampled_from(["channels", "waivers", "dev", "prod", "after", "min_soak", "expires", "x"]),
                    children,
                    max_size=4,
                )
            ),
            max_leaves=20,
        ).map(lambda data: yaml.safe_dump(data)),
    )
)
def test_any_input_gives_a_policy_or_a_config_error(text: str) -> None:
    try:
        parse_policy(text, Path("/nonexistent/policy.yaml"))
    except ConfigError as e:
        assert e.problems
        assert all(p.message and p.fix for p in e.problems)


# ----------------------------------------------------------------------------------------------------------
# The gate

GATE_POLICY = """\
channels:
  lab:
    require_boot_test: false
    require_signature: false
    allow_secrets: true
    max_cve_severity: low
  dev:
    max_cve_severity: critical
  staging:
    after: dev
    min_soak: 1h
    max_cve_severity: high
  prod:
    after: staging
    min_soak: 24h
    max_cve_severity: medium
    fixed_only: true
waivers:
  - {finding: CVE-PKG, package: openssl, channels: [staging, prod], reason: r, by: a@example.invalid,
     expires: 2027-01-31}
  - {finding: private-key, path: /root/.ssh/id_rsa, reason: r, by: b@example.invalid, expires: 2027-01-31}
  - {finding: CVE-OLD, reason: r, by: c@example.invalid, expires: 2026-05-01}
  - {finding: ssh-host-keys, reason: r, by: d@example.invalid, expires: 2026-06-01}
  - {finding: CVE-TIME, reason: r, by: e@example.invalid, expires: "2026-06-01T12:00:00Z"}
"""
POLICY = parse_policy(GATE_POLICY, Path("gate.yaml"))


class CandidateChanges(TypedDict, total=False):
    """Fields of a Candidate to change (any of them)."""

    ref: str
    status: Status
    boot_test_passed: bool
    findings: Sequence[Finding]
    signature_error: str | None
    scanned: bool
    revoked: bool
    revoked_ancestors: Sequence[str]
    entered: Mapping[str, datetime]
    vulndb_as_of: Mapping[str, datetime]


def _candidate(**changes: Unpack[CandidateChanges]) -> Candidate:
    """A version that passes every channel of POLICY at NOW, with `changes` applied."""
    good = Candidate(
        ref="web@7",
        status=Status.SIGNED,
        boot_test_passed=True,
        findings=(),
        signature_error=None,
        scanned=True,
        revoked=False,
        revoked_ancestors=(),
        entered={"dev": NOW - timedelta(hours=2), "staging": NOW - timedelta(hours=48)},
        vulndb_as_of={"osv": NOW - timedelta(hours=1)},
    )
    return dataclasses.replace(good, **changes)


def cve(
    id: str = "CVE-2026-0001",
    severity: Severity = Severity.CRITICAL,
    package: str = "openssl",
    fixed: str | None = "3.1",
) -> Finding:
    return Finding(
        kind=FindingKind.CVE,
        id=id,
        severity=severity,
        title=f"{id} in {package}",
        source="osv",
        package=package,
        installed="3.0",
        fixed=fixed,
    )


def secret(id: str = "private-key", path: str = "/root/.ssh/id_rsa") -> Finding:
    return Finding(
        kind=FindingKind.SECRET,
        id=id,
        severity=Severity.CRITICAL,
        title="private key",
        source="secrets",
        path=path,
        line=1,
        redacted="----…(1675)",
    )


def residue(id: str = "ssh-host-keys", path: str = "/etc/ssh/ssh_host_rsa_key") -> Finding:
    return Finding(kind=FindingKind.RESIDUE, id=id, severity=Severity.HIGH, title=id, source="residue", path=path)


# (id, channel, changes to the passing candidate, expected unmet names, waivers used, expired waivers)
GATES: list[tuple[str, str, CandidateChanges, list[str], list[str], list[str]]] = [
    ("clean to lab", "lab", {}, [], [], []),
    ("clean to dev", "dev", {}, [], [], []),
    ("clean to staging", "staging", {}, [], [], []),
    ("clean to prod", "prod", {}, [], [], []),
    ("revoked", "dev", {"revoked": True}, ["revoked"], [], []),
    ("revoked status", "dev", {"status": Status.REVOKED}, ["revoked"], [], []),
    ("revoked ancestor", "dev", {"revoked_ancestors": ("web@3",)}, ["revoked-ancestor"], [], []),
    ("deprecated", "dev", {"status": Status.DEPRECATED}, ["status"], [], []),
    ("failed", "dev", {"status": Status.FAILED}, ["status"], [], []),
    ("not scanned", "dev", {"scanned": False}, ["scan"], [], []),
    ("not scanned, even in lab", "lab", {"scanned": False}, ["scan"], [], []),
    ("boot test failed", "dev", {"boot_test_passed": False}, ["boot-test"], [], []),
    ("boot test not required", "lab", {"boot_test_passed": False}, [], [], []),
    ("signature fails", "dev", {"signature_error": "digest mismatch"}, ["signature"], [], []),
    ("signature not required", "lab", {"signature_error": "no signature"}, [], [], []),
    ("cve equal to max passes", "staging", {"findings": (cve(severity=Severity.HIGH),)}, [], [], []),
    (
        "cve above max",
        "staging",
        {"findings": (cve(severity=Severity.CRITICAL),)},
        ["cve CVE-2026-0001 in openssl"],
        [],
        [],
    ),
    ("critical cve allowed in dev", "dev", {"findings": (cve(),)}, [], [], []),
    ("cve medium in prod passes", "prod", {"findings": (cve(severity=Severity.MEDIUM),)}, [], [], []),
    (
        "fixed high cve in prod",
        "prod",
        {"findings": (cve(severity=Severity.HIGH),)},
        ["cve CVE-2026-0001 in openssl"],
        [],
        [],
    ),
    ("unfixed cve ignored by fixed_only", "prod", {"findings": (cve(fixed=None),)}, [], [], []),
    (
        "unfixed cve counts without fixed_only",
        "staging",
        {"findings": (cve(fixed=None),)},
        ["cve CVE-2026-0001 in openssl"],
        [],
        [],
    ),
    # Fail closed: an unrated CVE is judged as high by default (lab allows low), and passes where high is allowed.
    (
        "unknown severity is judged high",
        "lab",
        {"findings": (cve(severity=Severity.UNKNOWN),)},
        ["cve CVE-2026-0001 in openssl"],
        [],
        [],
    ),
    ("unknown severity within dev's critical", "dev", {"findings": (cve(severity=Severity.UNKNOWN),)}, [], [], []),
    ("waiver matches package and channel", "staging", {"findings": (cve("CVE-PKG"),)}, [], ["CVE-PKG"], []),
    (
        "waiver for another package",
        "staging",
        {"findings": (cve("CVE-PKG", package="libssl3"),)},
        ["cve CVE-PKG in libssl3"],
        [],
        [],
    ),
    (
        "waiver not for this channel",
        "lab",
        {"findings": (cve("CVE-PKG"),)},
        ["cve CVE-PKG in openssl"],
        [],
        [],
    ),
    ("secret waived by path", "prod", {"findings": (secret(),)}, [], ["private-key"], []),
    (
        "secret at another path",
        "prod",
        {"findings": (secret(path="/home/deploy/.ssh/id_rsa"),)},
        ["secret private-key at /home/deploy/.ssh/id_rsa"],
        [],
        [],
    ),
    ("secrets allowed in lab", "lab", {"findings": (secret(path="/x"),)}, [], [], []),
    ("residue waived", "dev", {"findings": (residue(),)}, [], ["ssh-host-keys"], []),
    (
        "residue always gates",
        "lab",
        {"findings": (residue("machine-id", "/etc/machine-id"),)},
        ["residue machine-id at /etc/machine-id"],
        [],
        [],
    ),
    (
        "expired waiver gates",
        "staging",
        {"findings": (cve("CVE-OLD"),)},
        ["cve CVE-OLD in openssl"],
        [],
        ["CVE-OLD"],
    ),
    (
        "waiver expiring exactly now is expired",
        "staging",
        {"findings": (cve("CVE-TIME"),)},
        ["cve CVE-TIME in openssl"],
        [],
        ["CVE-TIME"],
    ),
    ("expired waiver for a finding that passes anyway", "dev", {"findings": (cve("CVE-OLD"),)}, [], [], []),
    ("never in the previous channel", "prod", {"entered": {"dev": NOW - timedelta(days=9)}}, ["after"], [], []),
    ("soak too short", "staging", {"entered": {"dev": NOW - timedelta(minutes=59)}}, ["soak"], [], []),
    ("soak exactly min_soak", "staging", {"entered": {"dev": NOW - timedelta(hours=1)}}, [], [], []),
    ("prod soak exactly 24h", "prod", {"entered": {"staging": NOW - timedelta(hours=24)}}, [], [], []),
    (
        "everything wrong at once",
        "prod",
        {
            "status": Status.DEPRECATED,
            "revoked": True,
            "revoked_ancestors": ("web@1", "web@2"),
            "scanned": False,
            "boot_test_passed": False,
            "signature_error": "no signature",
            "findings": (
                cve(severity=Severity.HIGH),
                secret(path="/tmp/key"),
                residue("machine-id", "/etc/machine-id"),
            ),
            "entered": {"staging": NOW - timedelta(hours=1)},
        },
        [
            "revoked",
            "revoked-ancestor",
            "status",
            "scan",
            "boot-test",
            "signature",
            "cve CVE-2026-0001 in openssl",
            "secret private-key at /tmp/key",
            "residue machine-id at /etc/machine-id",
            "soak",
        ],
        [],
        [],
    ),
]


@pytest.mark.parametrize(
    ("channel", "changes", "unmet", "used", "expired"), [g[1:] for g in GATES], ids=[g[0] for g in GATES]
)
def test_gate(channel: str, changes: CandidateChanges, unmet: list[str], used: list[str], expired: list[str]) -> None:
    decision = evaluate(POLICY, channel, _candidate(**changes), now=NOW)
    assert decision.channel == channel
    assert [f.name for f in decision.unmet] == unmet
    assert decision.passed is (not unmet)
    assert [w.finding for w in decision.waivers_used] == used
    assert [w.finding for w in decision.expired_waivers] == expired
    assert all(f.detail.strip() for f in decision.unmet)


def _detail(channel: str, **changes: Unpack[CandidateChanges]) -> str:
    (failure,) = evaluate(POLICY, channel, _candidate(**changes), now=NOW).unmet
    return failure.detail


def test_details_say_what_to_do() -> None:
    assert "digest mismatch" in _detail("dev", signature_error="digest mismatch")
    assert "web@3" in _detail("dev", revoked_ancestors=("web@3",))
    assert "amiforge scan web@7" in _detail("dev", scanned=False)
    assert "amiforge promote web@7 --channel staging" in _detail("prod", entered={})
    cve_detail = _detail("staging", findings=(cve(),))
    assert "critical" in cve_detail and "high" in cve_detail and "3.1" in cve_detail
    soak = _detail("staging", entered={"dev": NOW - timedelta(minutes=59)})
    assert "59m of the 1h" in soak and "1m left" in soak and "2026-06-01T12:01:00+00:00" in soak
    expired = _detail("staging", findings=(cve("CVE-OLD"),))
    assert "EXPIRED" in expired and "2026-05-01" in expired and "c@example.invalid" in expired
    assert "/root/.ssh/id_rsa:1" in _detail("prod", findings=(secret(id="aws-key"),))


def test_a_date_waiver_holds_through_that_day_utc() -> None:
    candidate = _candidate(findings=(residue(),))
    last_second = datetime(2026, 6, 1, 23, 59, 59, tzinfo=UTC)
    assert evaluate(POLICY, "dev", candidate, now=last_second).passed
    after = evaluate(POLICY, "dev", candidate, now=last_second + timedelta(seconds=1))
    assert not after.passed
    assert [w.finding for w in after.expired_waivers] == ["ssh-host-keys"]


def test_naive_now_is_utc() -> None:
    naive = NOW.replace(tzinfo=None)
    candidate = _candidate(entered={"dev": NOW - timedelta(hours=1)})
    assert evaluate(POLICY, "staging", candidate, now=naive).passed


def test_unknown_channel_lists_the_channels() -> None:
    with pytest.raises(ConfigError) as caught:
        evaluate(POLICY, "qa", _candidate(), now=NOW)
    assert "lab, dev, staging, prod" in caught.value.message
    assert caught.value.exit_code == 2
    assert caught.value.problems[0].file == "gate.yaml"


def test_raise_if_unmet() -> None:
    evaluate(POLICY, "dev", _candidate(), now=NOW).raise_if_unmet()
    decision = evaluate(POLICY, "dev", _candidate(scanned=False, boot_test_passed=False), now=NOW)
    with pytest.raises(GateFailed) as caught:
        decision.raise_if_unmet()
    assert caught.value.exit_code == 4
    assert [f.name for f in caught.value.failures] == ["scan", "boot-test"]
    assert "promotion to dev" in caught.value.message


# ----------------------------------------------------------------------------------------------------------
# Property: findings only ever add unmet items

_findings = st.builds(
    Finding,
    kind=st.sampled_from(FindingKind),
    id=st.sampled_from(["CVE-PKG", "CVE-OLD", "CVE-TIME", "private-key", "ssh-host-keys", "CVE-2026-0001"]),
    severity=st.sampled_from(Severity),
    title=st.just("t"),
    source=st.just("test"),
    package=st.sampled_from([None, "openssl", "libssl3"]),
    fixed=st.sampled_from([None, "1.0"]),
    path=st.sampled_from([None, "/root/.ssh/id_rsa", "/etc/machine-id"]),
)
_candidates = st.builds(
    Candidate,
    ref=st.just("web@7"),
    status=st.sampled_from(Status),
    boot_test_passed=st.booleans(),
    findings=st.lists(_findings, max_size=4).map(tuple),
    signature_error=st.sampled_from([None, "bad"]),
    scanned=st.booleans(),
    revoked=st.booleans(),
    revoked_ancestors=st.sampled_from([(), ("web@1",)]),
    entered=st.dictionaries(
        st.sampled_from(["dev", "staging"]), st.sampled_from([NOW - timedelta(hours=h) for h in (0, 1, 2, 24, 48)])
    ),
)


@settings(max_examples=300, deadline=None)
@given(
    channel=st.sampled_from(list(POLICY.channels)),
    candidate=_candidates,
    extra=_findings,
    at=st.integers(0, 4),
    now=st.sampled_from([NOW, NOW + timedelta(days=400), datetime(2026, 6, 2, tzinfo=UTC)]),
)
def test_adding_a_finding_never_turns_fail_into_pass(
    channel: str, candidate: Candidate, extra: Finding, at: int, now: datetime
) -> None:
    before = evaluate(POLICY, channel, candidate, now=now)
    findings: Sequence[Finding] = list(candidate.findings)
    more = dataclasses.replace(candidate, findings=(*findings[:at], extra, *findings[at:]))
    after = evaluate(POLICY, channel, more, now=now)
    if not before.passed:
        assert not after.passed
    assert set(before.unmet) <= set(after.unmet)
    assert after.passed is (not after.unmet)
