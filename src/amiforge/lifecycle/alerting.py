"""Prometheus rules and Alertmanager routing generated from the policy's SLOs (`amiforge export`), pure.

Multi-window, multi-burn-rate alerts (the Google SRE workbook, "Alerting on SLOs"): a page when the error budget
burns 14.4× over 1 h and 5 m, or 6× over 6 h and 30 m; a ticket at 1× over 3 d and 6 h. The long window says it
matters, the short one that it is still happening. Two SLOs per image: boot success (bad = not ready, a timeout
included) and time to ready (bad = not ready within the threshold), against launches on fleets (boot tests have
their own gate).

The noise rules:
- a target with a rollout in progress is not alerted on: the rollout's own gates judge its waves then (and roll
  back); once it rolled back, the bad version runs nowhere, and
- only a version that still runs on the target alerts (`amiforge_instances > 0`), so a version rolled back or
  replaced does not page for the failures its rollout already handled;
- Alertmanager groups by target and version (one incident per version on a target, whatever its SLOs say), a page
  silences the ticket of the same version, and routes by the image's owner (its recipe's `owner` tag, else `team`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from amiforge.lifecycle.exporter import bucket_label
from amiforge.model import BOOT_TEST_TARGET
from amiforge.policy.slos import ImageSlos, Slos

GROUP_LABELS = "image, version, target"
# (severity, long window, short window, burn rate) — the workbook's table for a 30-day SLO.
BURN_WINDOWS: tuple[tuple[str, str, str, float], ...] = (
    ("page", "1h", "5m", 14.4),
    ("page", "6h", "30m", 6.0),
    ("ticket", "3d", "6h", 1.0),
)
WINDOWS = ("5m", "30m", "1h", "6h", "3d")
ALERTS = {"boot_success": "AmiforgeBootFailureBurnRate", "time_to_ready": "AmiforgeSlowBootBurnRate"}
RATIO = {"boot_success": "amiforge:boot_failure:ratio_rate{w}", "time_to_ready": "amiforge:boot_slow:ratio_rate{w}"}
DEFAULT_RECEIVER = "amiforge-default"
OWNER_TAGS = ("owner", "team")  # the recipe tag naming who owns an image, the first found


@dataclass(frozen=True)
class SloGroup:
    """Images judged by the same objectives: `images` listed, or every other image (`others` the ones excluded)."""

    slos: Slos
    images: tuple[str, ...] = ()
    others: tuple[str, ...] = ()

    def selector(self, *extra: str) -> str:
        matchers = [f'target!="{BOOT_TEST_TARGET}"']
        if self.images:
            matchers.append(f'image=~"{_alternatives(self.images)}"')
        elif self.others:
            matchers.append(f'image!~"{_alternatives(self.others)}"')
        return "{" + ", ".join([*matchers, *extra]) + "}"


def _alternatives(names: Sequence[str]) -> str:
    return "|".join(names)  # image names are [a-z0-9-]: nothing to escape in a regular expression


def slo_groups(slos: ImageSlos) -> list[SloGroup]:
    """The default's group (every image without objectives of its own) and one per image whose objectives differ."""
    own = {image: slos.of(image) for image in sorted(slos.images)}
    differing = {image: s for image, s in own.items() if s != slos.default}
    groups = [SloGroup(slos.default, others=tuple(differing))]
    by_slos: dict[Slos, list[str]] = {}
    for image, s in differing.items():
        by_slos.setdefault(s, []).append(image)
    groups += [SloGroup(s, images=tuple(images)) for s, images in by_slos.items()]
    return groups


def unreachable_pages(slos: ImageSlos) -> list[str]:
    """Objectives so loose that a page can never fire (14.4 × the budget is 100 % of launches failing, or more)."""
    found = []
    for group in slo_groups(slos):
        who = ", ".join(group.images) or "the default"
        for name, budget in (("boot_success", group.slos.boot_budget), ("time_to_ready", group.slos.ready_budget)):
            if 14.4 * budget >= 1:
                found.append(f"{who}: {name} allows {budget:.1%} bad launches; a 14.4× burn would be over 100 %, "
                             "so only the 6× page and the ticket can fire")  # fmt: skip
    return found


def prometheus_rules(slos: ImageSlos) -> dict[str, Any]:
    """The rule file: recording rules of the bad-launch ratios per window, and the burn-rate alerts. Images with
    objectives of their own are `or`-ed into the same rules (one rule per name: promtool refuses duplicates)."""
    groups = slo_groups(slos)
    recording: list[dict[str, Any]] = []
    for w in WINDOWS:
        attempts = f"amiforge:boot_attempts:rate{w}"
        recording.append({"record": attempts, "expr": f"sum by ({GROUP_LABELS}) "
                          f'(rate(amiforge_boot_attempts_total{{target!="{BOOT_TEST_TARGET}"}}[{w}]))'})  # fmt: skip
        recording.append({"record": f"amiforge:boot_failures:rate{w}", "expr": f"sum by ({GROUP_LABELS}) "
                          f'(rate(amiforge_boot_attempts_total{{target!="{BOOT_TEST_TARGET}", outcome!="ready"}}'
                          f"[{w}]))"})  # fmt: skip
        recording.append({"record": RATIO["boot_success"].format(w=w),
                          "expr": f"amiforge:boot_failures:rate{w} / {attempts}"})  # fmt: skip
        # Ready within each group's threshold (its own `le`), the groups' series side by side.
        within = " or ".join(
            f"sum by ({GROUP_LABELS}) (rate(amiforge_time_to_ready_seconds_bucket"
            f"{g.selector('le=' + chr(34) + bucket_label(g.slos.time_to_ready.under) + chr(34))}[{w}]))"
            for g in groups
        )
        recording.append({"record": f"amiforge:boots_ready_in_time:rate{w}", "expr": within})
        recording.append({"record": RATIO["time_to_ready"].format(w=w),
                          "expr": f"1 - (amiforge:boots_ready_in_time:rate{w} / {attempts})"})  # fmt: skip
    alerts = [_alert(groups, slo, severity) for slo in ALERTS for severity in ("page", "ticket")]
    # One group: its rules run in order at each evaluation, so every alert reads the ratios of that same evaluation
    # (groups run concurrently, and an alert in another group could read the previous one's).
    return {"groups": [{"name": "amiforge-slo", "rules": [*recording, *alerts]}]}


def _alert(groups: Sequence[SloGroup], slo: str, severity: str) -> dict[str, Any]:
    ratio = RATIO[slo]
    conditions = []
    for group in groups:
        budget = group.slos.boot_budget if slo == "boot_success" else group.slos.ready_budget
        for sev, long, short, burn in BURN_WINDOWS:
            if sev == severity:
                limit = _number(burn * budget)
                conditions.append(f"({ratio.format(w=long)}{group.selector()} > {limit}"
                                  f" and {ratio.format(w=short)}{group.selector()} > {limit})")  # fmt: skip
    expr = (
        "(\n  " + "\n  or ".join(conditions) + "\n)\n"
        "unless on (target) (amiforge_rollout_in_progress == 1)\n"
        f"and on ({GROUP_LABELS}) (amiforge_instances > 0)"
    )
    windows = " or ".join(f"{burn:g}x over {long} and {short}" for sev, long, short, burn in BURN_WINDOWS
                          if sev == severity)  # fmt: skip
    what = "not ready" if slo == "boot_success" else "not ready within the image's time-to-ready threshold"
    return {
        "alert": ALERTS[slo],
        "expr": expr,
        "labels": {"severity": severity, "slo": slo},
        "annotations": {
            "summary": f"{{{{ $labels.version }}}} on {{{{ $labels.target }}}} burns its {slo} error budget "
                       f"({windows})",
            "description": f"{{{{ printf \"%.4f\" $value }}}} of launches over the long window were {what}; "
                           "`amiforge metrics --version {{ $labels.version }}` shows the objective and budget left.",
            "runbook": "amiforge incident {{ $labels.version }}; amiforge rollback {{ $labels.target }}",
        },
    }  # fmt: skip


def _number(value: float) -> str:
    return f"{value:.10g}"


def alertmanager_config(owners: Mapping[str, str], *, webhook: str | None = None) -> dict[str, Any]:
    """Routing by the image's owner (`owners`: image → owner), grouped by target and version; page and ticket
    receivers per owner (webhook: where each sends, or none: receivers to fill in)."""
    teams = sorted(set(owners.values()))

    def receiver(name: str) -> dict[str, Any]:
        found: dict[str, Any] = {"name": name}
        if webhook:
            found["webhook_configs"] = [{"url": webhook, "send_resolved": True}]
        return found

    routes = []
    for team in teams:
        images = sorted(image for image, owner in owners.items() if owner == team)
        routes.append({
            "matchers": [f'image=~"{_alternatives(images)}"'],
            "receiver": f"{team}-ticket",
            "routes": [{"matchers": ['severity="page"'], "receiver": f"{team}-page"}],
        })  # fmt: skip
    return {
        "route": {
            "receiver": DEFAULT_RECEIVER,
            "group_by": ["target", "version"],
            "group_wait": "30s",
            "group_interval": "5m",
            "repeat_interval": "4h",
            "routes": routes,
        },
        "receivers": [receiver(DEFAULT_RECEIVER)]
        + [receiver(f"{team}-{kind}") for team in teams for kind in ("page", "ticket")],
        "inhibit_rules": [
            {
                "source_matchers": ['severity="page"'],
                "target_matchers": ['severity="ticket"'],
                "equal": ["image", "version", "target"],
            }
        ],
    }
