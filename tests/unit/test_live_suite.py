"""The live AWS suite (tests/live) as CI sees it, without an account: it imports, every test is collected, and every
one is skipped for want of AMIFORGE_LIVE_AWS=1 — none runs, none errors. Run in a subprocess, as a developer would
run it, with no AWS credentials and AWS endpoints on a closed loopback port in case a guard ever gave way."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LIVE_TESTS = {
    "test_bake_boot_test_and_scan",
    "test_sign_with_a_kms_key",
    "test_distribute_copies_to_a_second_region",
    "test_distribute_shares_with_a_second_account",
    "test_promote_publishes_a_parameter_and_a_launch_template_version",
    "test_rollout_replaces_the_member_of_a_tagged_auto_scaling_group",
}


def _pytest(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AMIFORGE_", "AWS_"))}
    env |= {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "TEST-0001", "AWS_SECRET_ACCESS_KEY": "x"}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args, "tests/live"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_the_live_suite_is_collected_and_every_test_skipped_without_its_opt_in() -> None:
    collected = _pytest("--collect-only")
    assert collected.returncode == 0, collected.stdout + collected.stderr
    ids = {line.rpartition("::")[2] for line in collected.stdout.splitlines() if "::" in line}
    assert ids >= LIVE_TESTS, sorted(LIVE_TESTS - ids)

    ran = _pytest("-rs")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert re.search(rf"\b{len(ids)} skipped\b", ran.stdout) and " passed" not in ran.stdout, ran.stdout
    reasons = [line for line in ran.stdout.splitlines() if line.startswith("SKIPPED")]
    assert len(reasons) == len(ids) and all("AMIFORGE_LIVE_AWS=1" in r for r in reasons), reasons
