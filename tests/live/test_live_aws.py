"""A real bake in a real AWS account, through the CLI. Skipped unless AMIFORGE_LIVE_AWS=1 (it costs money and needs
the internet, which CI does not have); run it by hand before a release:

    AMIFORGE_LIVE_AWS=1 AMIFORGE_LIVE_REGION=eu-west-1 AMIFORGE_LIVE_INSTANCE_PROFILE=amiforge-builder \
        .venv/bin/pytest tests/live -m live

The instance profile must allow SSM (AmazonSSMManagedInstanceCore); the caller needs the actions of
`amiforge doctor --aws` for bake, boot-test and scan. The test deregisters the image and deletes its snapshots at the
end whatever happens; `amiforge gc` finds anything a crash left behind (everything is tagged amiforge:managed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = [
    pytest.mark.live,
    pytest.mark.skipif(os.environ.get("AMIFORGE_LIVE_AWS") != "1", reason="AMIFORGE_LIVE_AWS=1 runs the live suite"),
]

RECIPE = """\
name: live-web
provider:
  type: aws
  region: {region}
  instance_type: t3.micro
  source: {{ssm_parameter: /aws/service/debian/release/bookworm/latest/amd64}}
  instance_profile: {profile}
steps:
  - packages: [nginx]
  - service: {{enable: [nginx]}}
checks:
  ready_within: 300s
  units: [nginx]
  http: [{{port: 80, path: /, expect_status: 200}}]
"""


def _cli(env: dict[str, str], *args: str) -> Any:
    proc = subprocess.run(
        [sys.executable, "-m", "amiforge", *args, "--json"], env=env, capture_output=True, text=True, timeout=3600
    )
    assert proc.returncode == 0, f"amiforge {' '.join(args)}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout)


@pytest.fixture
def live(tmp_path: Path) -> Iterator[tuple[dict[str, str], Path, list[str]]]:
    region = os.environ.get("AMIFORGE_LIVE_REGION", "eu-west-1")
    profile = os.environ["AMIFORGE_LIVE_INSTANCE_PROFILE"]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(region=region, profile=profile))
    env = {**os.environ, "AMIFORGE_DATA_DIR": str(tmp_path / "data")}
    env.pop("AMIFORGE_STORE_URL", None)
    made: list[str] = []
    yield env, recipe, made
    import boto3  # only here: the live suite is the one test that talks to AWS itself

    ec2 = boto3.client("ec2", region_name=region)
    for image_id in made:
        image = ec2.describe_images(ImageIds=[image_id])["Images"][0]
        ec2.deregister_image(ImageId=image_id)
        for mapping in image.get("BlockDeviceMappings", []):
            if "SnapshotId" in mapping.get("Ebs", {}):
                ec2.delete_snapshot(SnapshotId=mapping["Ebs"]["SnapshotId"])


def test_bake_test_and_scan_in_a_real_account(live: tuple[dict[str, str], Path, list[str]]) -> None:
    env, recipe, made = live
    baked = _cli(env, "bake", str(recipe))
    shown = _cli(env, "images", "show", "live-web@1")
    made += [a["location"] for a in shown["artifacts"]]
    assert baked["version"]["status"] == "tested"
    assert baked["boot_report"]["time_to_ready"] is not None
    scanned = _cli(env, "scan", "live-web@1")
    assert scanned["packages"] > 100  # a Debian cloud image with nginx, read from its snapshot
    assert _cli(env, "events", "live-web@1")
