"""Distribution on moto: copies per region under that region's key, tags, shares, protection, preflight refusals
(keys, and the encryption of what is shared: the source's key, the targets' keys and their policies, regions without a
key that would encrypt), idempotency, kill-and-resume after every API call, and throttling. See distribute_fixtures.py
for what is emulated."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from botocore.exceptions import ClientError
from conftest import ACCOUNT, Aws
from distribute_fixtures import (
    CopyImageEmulation,
    Crash,
    Crashed,
    DeregistrationProtection,
    SharingEmulation,
    aws_managed_ebs_key,
    backend_tags,
)
from fake_machine import Clock
from moto.ec2.models import ec2_backends
from moto.kms.models import kms_backends

from amiforge.errors import ConfigError, StateError
from amiforge.providers.aws.distribute import (
    SOURCE_IMAGE_TAG,
    DistributionPlan,
    DistributionResult,
    Progress,
    RegionTarget,
    client_token,
    distribute,
    plan_distribution,
    preflight,
)
from amiforge.providers.aws.images import describe_image
from amiforge.waiting import Wait

SOURCE_REGION = "us-east-1"
TARGETS = ("eu-west-1", "ap-southeast-2")
SHARE_ACCOUNTS = ("111122223333", "444455556666")
ORG = "arn:aws:organizations::999988887777:organization/o-abcdefghij"
OU = "arn:aws:organizations::999988887777:ou/o-abcdefghij/ou-ab12-cdefgh12"


def receivers_policy(*accounts: str, org: str | None = "o-abcdefghij", condition: Any = None) -> dict[str, Any]:
    """The owner's statement, one for the receiving accounts and one for the organization (and so its OUs), as the EBS
    User Guide's key-sharing page describes; `condition` on the accounts' statement."""
    use = ["kms:DescribeKey", "kms:CreateGrant", "kms:Decrypt", "kms:GenerateDataKey*", "kms:ReEncrypt*"]
    statements: list[dict[str, Any]] = [
        {"Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:root"}, "Action": "kms:*", "Resource": "*"}
    ]
    if accounts:
        named = {"Effect": "Allow", "Principal": {"AWS": [f"arn:aws:iam::{a}:root" for a in accounts]}}
        statements.append({**named, "Action": use, "Resource": "*", **({"Condition": condition} if condition else {})})
    if org:
        statements.append(
            {
                "Effect": "Allow",
                "Principal": "*",
                "Action": use,
                "Resource": "*",
                "Condition": {"StringEquals": {"aws:PrincipalOrgID": org}},
            }
        )
    return {"Version": "2012-10-17", "Statement": statements}


class Env:
    def __init__(self, aws: Aws, copies: CopyImageEmulation, protection: DeregistrationProtection, crash: Crash):
        self.aws, self.copies, self.protection, self.crash = aws, copies, protection, crash
        self.keys = {r: self.key(r) for r in TARGETS}

    def key(self, region: str, policy: dict[str, Any] | None = None) -> str:
        """A customer managed key whose policy lets the plan's receivers use it (unless `policy` says otherwise)."""
        text = json.dumps(policy or receivers_policy(*SHARE_ACCOUNTS))
        return str(self.kms(region).create_key(Description=f"ebs {region}", Policy=text)["KeyMetadata"]["Arn"])

    def encrypt_source(self, source: str, key: str) -> None:
        """The source's snapshot encrypted under `key` (moto's images have one snapshot)."""
        snapshot = ec2_backends[ACCOUNT][SOURCE_REGION].amis[source].ebs_snapshot
        snapshot.encrypted, snapshot.kms_key_id = True, key

    def ec2(self, region: str) -> Any:
        return self.aws.session.client("ec2", region)

    def kms(self, region: str) -> Any:
        return self.aws.session.client("kms", region)

    def source(self, name: str = "web-20240501") -> str:
        ec2 = self.ec2(SOURCE_REGION)
        instance = ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
        tags = [{"Key": "amiforge:managed", "Value": "true"}, {"Key": "app", "Value": "web"}]
        tags += [{"Key": "amiforge:run", "Value": "bake-1"}]
        image = ec2.create_image(
            InstanceId=instance,
            Name=name,
            Description="web",
            TagSpecifications=[{"ResourceType": "image", "Tags": tags}],
        )
        return str(image["ImageId"])

    def plan(self, source: str, *, run_id: str = "dist-1", **kw: Any) -> DistributionPlan:
        targets = [RegionTarget(r, self.keys[r]) for r in TARGETS]
        share: dict[str, Any] = {"accounts": SHARE_ACCOUNTS, "org_arns": [ORG], "ou_arns": [OU]}
        return plan_distribution(source, SOURCE_REGION, targets, run_id=run_id, **{**share, **kw})

    def state(self, source: str) -> dict[str, Any]:
        """Everything distribution changes in each region, with the (per-test) ids replaced by placeholders."""
        out: dict[str, Any] = {}
        for region in TARGETS:
            ec2 = self.ec2(region)
            filters = [{"Name": f"tag:{SOURCE_IMAGE_TAG}", "Values": [source]}]
            images = ec2.describe_images(Owners=["self"], Filters=filters)["Images"]
            described = []
            for image in images:
                image_id = image["ImageId"]
                snapshots = [m["Ebs"]["SnapshotId"] for m in image["BlockDeviceMappings"]]
                backing = ec2.describe_snapshots(SnapshotIds=snapshots)["Snapshots"]
                attribute = ec2.describe_image_attribute(ImageId=image_id, Attribute="launchPermission")
                volume_perms = [
                    sorted(
                        p["UserId"]
                        for p in ec2.describe_snapshot_attribute(SnapshotId=s, Attribute="createVolumePermission")[
                            "CreateVolumePermissions"
                        ]
                    )
                    for s in snapshots
                ]
                described.append(
                    {
                        "name": image["Name"],
                        "public": image["Public"],
                        "tags": _tags(image, source),
                        "snapshot_tags": [_tags(snapshot, source) for snapshot in backing],
                        "launch": sorted(str(sorted(p.items())) for p in attribute["LaunchPermissions"]),
                        "volume": volume_perms,
                        "protected": (region, image_id) in self.protection.protected,
                        "kms": [snapshot.get("KmsKeyId") for snapshot in backing],
                    }
                )
            out[region] = described
        return out


def _tags(resource: dict[str, Any], source: str) -> list[tuple[str, str]]:
    return sorted((t["Key"], t["Value"].replace(source, "<src>")) for t in resource.get("Tags", []))


@pytest.fixture
def env(aws: Aws, monkeypatch: pytest.MonkeyPatch) -> Env:
    return _env(aws, monkeypatch)


def _env(aws: Aws, monkeypatch: pytest.MonkeyPatch) -> Env:
    copies, protection, crash = CopyImageEmulation(), DeregistrationProtection(), Crash()
    copies.install(monkeypatch)
    SharingEmulation().install(monkeypatch)
    events = aws.session.boto_session.events
    crash.install(events)
    protection.install(events)
    return Env(aws, copies, protection, crash)


def _run(env: Env, plan: DistributionPlan, **kw: Any) -> DistributionResult:
    """distribute() on a fake clock: its waits for pending copies never sleep, and their deadlines still pass."""
    clock = Clock()
    kw.setdefault(
        "copy_wait", Wait(first_delay=1.0, max_delay=30.0, deadline=3 * 3600.0, sleep=clock.sleep, clock=clock)
    )
    return distribute(plan, env.aws.session, **kw)


# --- planning -----------------------------------------------------------------------------------------------------


def test_plan_lists_every_problem() -> None:
    with pytest.raises(ConfigError) as caught:
        plan_distribution(
            "ami-nope",
            "us-east-1",
            [RegionTarget("eu-west-1"), RegionTarget("eu-west-1"), RegionTarget("us-east-1"), RegionTarget("mars")],
            run_id="r1",
            accounts=["12345", "111122223333"],
            org_arns=["arn:aws:organizations::1:organization/x"],
            ou_arns=["ou-1234"],
            public=True,
        )
    messages = "\n".join(p.render() for p in caught.value.problems)
    for expected in (
        "'ami-nope' is not an image id",
        "eu-west-1 is listed twice",
        "us-east-1 is the source region",
        "'mars' is not an AWS region",
        "'12345' is not an account id",
        "not an organization ARN",
        "not an organizational-unit ARN",
        "--public",
    ):
        assert expected in messages, messages
    assert len(caught.value.problems) == 8
    with pytest.raises(ConfigError, match="1 problem"):
        plan_distribution(
            "ami-12345678", "us-east-1", [RegionTarget("eu-west-1", "k")], run_id="r", public=True, public_flag=True
        )  # encrypted cannot be public


def test_client_token_is_deterministic_and_distinct() -> None:
    plan = plan_distribution("ami-12345678", "us-east-1", [RegionTarget(r) for r in TARGETS], run_id="r")
    again = plan_distribution("ami-12345678", "us-east-1", [RegionTarget(r) for r in TARGETS], run_id="r")
    other = plan_distribution("ami-12345678", "us-east-1", [RegionTarget(r) for r in TARGETS], run_id="r2")
    tokens = {client_token(plan, r) for r in TARGETS}
    assert tokens == {client_token(again, r) for r in TARGETS} and len(tokens) == 2
    assert tokens.isdisjoint(client_token(other, r) for r in TARGETS)
    assert all(len(t) <= 64 for t in tokens)


# --- distribution -------------------------------------------------------------------------------------------------


def test_happy_path_two_regions(env: Env) -> None:
    source = env.source()
    progress: list[Progress] = []
    result = _run(env, env.plan(source), on_progress=progress.append)
    assert set(result.image_ids) == set(TARGETS)
    assert not any(r.adopted for r in result.regions)
    state = env.state(source)
    for region in TARGETS:
        [image] = state[region]
        assert image["name"] == "web-20240501"
        tags = dict(image["tags"])
        assert tags["app"] == "web" and tags["amiforge:managed"] == "true"
        assert tags["amiforge:run"] == "dist-1" and tags[SOURCE_IMAGE_TAG] == "<src>"
        assert tags["amiforge:source-region"] == SOURCE_REGION
        assert image["public"] is False
        launch = "".join(image["launch"])
        assert all(a in launch for a in SHARE_ACCOUNTS) and ORG in launch and OU in launch and "all" not in launch
        assert image["volume"] == [sorted(SHARE_ACCOUNTS)]
        assert image["protected"] is True
        assert image["kms"] == [env.keys[region]]  # each region's own key, on the copy's snapshot
        assert image["snapshot_tags"] == [image["tags"]]  # the snapshot is amiforge's too (sharing, gc)
        assert result.image_ids[region] not in ec2_backends[ACCOUNT][SOURCE_REGION].amis
    assert {(p.region, p.step) for p in progress} >= {(r, s) for r in TARGETS for s in ("copied", "shared", "done")}
    assert env.aws.calls["ec2.CopyImage"] == 2


def test_the_source_is_shared_too_and_a_plan_may_only_share(env: Env) -> None:
    source = env.source()
    ec2 = env.ec2(SOURCE_REGION)

    def launch_permissions() -> list[dict[str, str]]:
        return list(ec2.describe_image_attribute(ImageId=source, Attribute="launchPermission")["LaunchPermissions"])

    assert launch_permissions() == []
    share_only = plan_distribution(source, SOURCE_REGION, [], run_id="share", accounts=SHARE_ACCOUNTS[:1])
    result = _run(env, share_only)
    assert result.regions == () and env.aws.calls["ec2.CopyImage"] == 0
    assert launch_permissions() == [{"UserId": SHARE_ACCOUNTS[0]}]
    snapshot = describe_image(env.aws.session, SOURCE_REGION, source)["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"]
    volume = ec2.describe_snapshot_attribute(SnapshotId=snapshot, Attribute="createVolumePermission")
    assert volume["CreateVolumePermissions"] == [{"UserId": SHARE_ACCOUNTS[0]}]
    with pytest.raises(ConfigError, match="no one to share with"):
        plan_distribution(source, SOURCE_REGION, [], run_id="nothing")


def test_public_needs_the_flag_and_then_shares_with_all(env: Env) -> None:
    source = env.source()
    targets = [RegionTarget(r) for r in TARGETS]  # public images cannot be encrypted
    with pytest.raises(ConfigError, match="--public"):
        plan_distribution(source, SOURCE_REGION, targets, run_id="pub", public=True)
    plan = plan_distribution(source, SOURCE_REGION, targets, run_id="pub", public=True, public_flag=True)
    result = _run(env, plan)
    for region in TARGETS:
        [image] = env.state(source)[region]
        assert image["public"] is True and image["kms"] == [None]
    assert all(r.shared_with == ("all",) for r in result.regions)


def test_preflight_refuses_bad_keys_before_any_copy(env: Env) -> None:
    source = env.source()
    eu, ap = TARGETS
    env.kms(eu).disable_key(KeyId=env.keys[eu].rsplit("/", 1)[1])  # moto: key id only
    key_id = env.keys[ap].rsplit("/", 1)[1]
    kms_backends[ACCOUNT][ap].keys[key_id].key_manager = "AWS"  # moto reports every key as CUSTOMER
    env.aws.calls.reset()
    with pytest.raises(ConfigError, match="nothing was copied") as caught:
        _run(env, env.plan(source))
    rendered = caught.value.diagnostics()
    assert f"kms_key {env.keys[eu]} in {eu}: the key is Disabled" in rendered
    assert f"kms_key {env.keys[ap]} in {ap}: an AWS-managed key" in rendered and "cannot be shared" in rendered
    assert env.aws.calls["ec2.CopyImage"] == 0
    assert not _writes(env)
    assert env.state(source) == {r: [] for r in TARGETS}

    # An unknown key is a problem too; an AWS-managed key is fine when nothing is shared.
    missing = "arn:aws:kms:eu-west-1:123456789012:key/11111111-2222-3333-4444-555555555555"
    with pytest.raises(ConfigError) as caught:
        _run(
            env, plan_distribution(source, SOURCE_REGION, [RegionTarget(eu, missing)], run_id="x", accounts=["1" * 12])
        )
    assert "does not exist" in caught.value.diagnostics() or "NotFoundException" in caught.value.diagnostics()
    unshared = plan_distribution(source, SOURCE_REGION, [RegionTarget(ap, env.keys[ap])], run_id="solo")
    assert _run(env, unshared).regions[0].shared_with == ()


def _writes(env: Env) -> list[str]:
    """The calls made that change something (anything but Describe*, Get* and List*)."""
    reads = ("Describe", "Get", "List")
    return [f"{svc}.{op}" for (svc, op), n in env.aws.calls.counts.items() if n and not op.startswith(reads)]


def test_preflight_refuses_encrypted_source_without_key_when_sharing(env: Env) -> None:
    source = env.source()
    env.encrypt_source(source, env.key(SOURCE_REGION))  # a customer key the receivers may use
    plan = plan_distribution(source, SOURCE_REGION, [RegionTarget(r) for r in TARGETS], run_id="e", ou_arns=[OU])
    env.aws.calls.reset()
    with pytest.raises(ConfigError, match="nothing was copied") as caught:
        _run(env, plan)
    rendered = caught.value.diagnostics()
    assert "default EBS key" in rendered and "eu-west-1, ap-southeast-2 has no kms_key" in rendered
    assert env.aws.calls["ec2.CopyImage"] == 0


def test_preflight_refuses_a_source_under_an_aws_managed_key_though_every_region_has_one(env: Env) -> None:
    """EC2 refuses to share an image under an AWS-managed key (the sharing emulation answers as AWS does): preflight
    refuses the plan before the source is shared or anything copied, whatever the targets' keys."""
    source = env.source()
    env.encrypt_source(source, aws_managed_ebs_key(ACCOUNT, SOURCE_REGION))
    env.aws.calls.reset()
    for plan in (env.plan(source), plan_distribution(source, SOURCE_REGION, [], run_id="s", accounts=SHARE_ACCOUNTS)):
        with pytest.raises(ConfigError, match="nothing was copied") as caught:
            _run(env, plan)
        rendered = caught.value.diagnostics()
        assert f"source {source} in {SOURCE_REGION} is encrypted under" in rendered
        assert "an AWS-managed key" in rendered and "cannot be shared" in rendered
    assert not _writes(env)
    # Kept in the account, it is no problem.
    alone = plan_distribution(source, SOURCE_REGION, [RegionTarget(TARGETS[0], env.keys[TARGETS[0]])], run_id="a")
    assert _run(env, alone).regions[0].shared_with == ()


def test_preflight_refuses_a_source_key_whose_policy_leaves_the_receivers_out(env: Env) -> None:
    source = env.source()
    owner_only = env.kms(SOURCE_REGION).create_key(Description="owner only")["KeyMetadata"]["Arn"]  # moto's default
    env.encrypt_source(source, owner_only)
    env.aws.calls.reset()
    with pytest.raises(ConfigError, match="nothing was copied") as caught:
        _run(env, env.plan(source))
    rendered = caught.value.diagnostics()
    assert f"encrypted under {owner_only}: its key policy refuses the receivers" in rendered
    assert f"{SHARE_ACCOUNTS[0]} is not allowed kms:DescribeKey" in rendered
    assert f"arn:aws:iam::{SHARE_ACCOUNTS[0]}:root" in rendered  # the fix names the principals to allow
    assert not _writes(env)


def test_a_target_key_whose_policy_leaves_the_receivers_out_is_refused(env: Env) -> None:
    source = env.source()
    eu, _ap = TARGETS
    env.keys[eu] = env.key(eu, receivers_policy(SHARE_ACCOUNTS[0], org=None))  # the second account is left out
    with pytest.raises(ConfigError, match="nothing was copied") as caught:
        _run(env, env.plan(source))
    rendered = caught.value.diagnostics()
    assert f"kms_key {env.keys[eu]} in {eu}: its key policy refuses the receivers" in rendered
    assert f"{SHARE_ACCOUNTS[1]} is not allowed" in rendered  # the organization: undecided, so not refused
    assert SHARE_ACCOUNTS[0] + " is" not in rendered


def test_a_key_policy_a_static_read_cannot_decide_is_a_note_not_a_refusal(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    source = env.source()
    condition = {"StringEquals": {"aws:SourceIp": "203.0.113.0/24"}}
    env.encrypt_source(source, env.key(SOURCE_REGION, receivers_policy(*SHARE_ACCOUNTS, condition=condition)))
    plan = env.plan(source)
    report = preflight(plan, env.aws.session)
    assert len(report.notes) == 1 and "condition StringEquals aws:SourceIp" in report.notes[0]
    assert all(a in report.notes[0] for a in SHARE_ACCOUNTS)
    with caplog.at_level(logging.WARNING, logger="amiforge.providers.aws.distribute"):
        result = _run(env, plan)
    assert set(result.image_ids) == set(TARGETS)
    assert any("aws:SourceIp" in r.getMessage() for r in caplog.records)


def test_preflight_refuses_a_region_without_key_that_encrypts_by_default(env: Env) -> None:
    """CopyImage in a region with EBS encryption by default encrypts the copy of an unencrypted source under the
    region's default key; the emulations copy it so and then refuse to share it, as AWS would after the copy."""
    source = env.source()
    eu, ap = TARGETS
    env.ec2(eu).enable_ebs_encryption_by_default()
    targets = [RegionTarget(eu), RegionTarget(ap, env.keys[ap])]
    plan = plan_distribution(source, SOURCE_REGION, targets, run_id="d", accounts=SHARE_ACCOUNTS)
    env.aws.calls.reset()
    with pytest.raises(ConfigError, match="nothing was copied") as caught:
        _run(env, plan)
    rendered = caught.value.diagnostics()
    assert f"EBS encryption by default is on in {eu}, which has no kms_key" in rendered
    assert f"regions[{eu}].kms_key" in rendered
    assert env.aws.calls["ec2.CopyImage"] == 0
    # Kept in the account, the encrypted copy is fine; a region that does not encrypt by default needs no key.
    private = plan_distribution(source, SOURCE_REGION, targets, run_id="p")
    assert _run(env, private).image_ids.keys() == {eu, ap}
    other = env.source("other")
    unencrypting = plan_distribution(other, SOURCE_REGION, [RegionTarget(ap)], run_id="u", accounts=SHARE_ACCOUNTS)
    assert _run(env, unencrypting).regions[0].kms_key_arn is None


def test_an_encrypted_source_cannot_be_made_public(env: Env) -> None:
    source = env.source()
    env.encrypt_source(source, env.key(SOURCE_REGION))
    plan = plan_distribution(source, SOURCE_REGION, [], run_id="pub", public=True, public_flag=True)
    env.aws.calls.reset()
    with pytest.raises(ConfigError, match="nothing was copied") as caught:
        _run(env, plan)
    assert "an encrypted image cannot be made public" in caught.value.diagnostics()
    assert not _writes(env)


def test_sharing_emulation_refuses_what_is_under_an_aws_managed_key(env: Env) -> None:
    """ModifyImageAttribute and ModifySnapshotAttribute refuse to share an image or snapshot under an AWS-managed key
    (either request form), as EC2 answers; a customer key or no encryption is shared, and removing is never refused."""
    ec2 = env.ec2(SOURCE_REGION)
    managed, customer, plain = env.source("managed"), env.source("customer"), env.source("plain")
    env.encrypt_source(managed, aws_managed_ebs_key(ACCOUNT, SOURCE_REGION))
    env.encrypt_source(customer, env.key(SOURCE_REGION))
    account = SHARE_ACCOUNTS[0]

    def snapshot_of(image: str) -> str:
        return str(ec2_backends[ACCOUNT][SOURCE_REGION].amis[image].ebs_snapshot.id)

    for share in (
        {"LaunchPermission": {"Add": [{"UserId": account}]}},
        {"OperationType": "add", "UserIds": [account]},
        {"LaunchPermission": {"Add": [{"OrganizationArn": ORG}]}},
    ):
        with pytest.raises(ClientError) as refused:
            ec2.modify_image_attribute(ImageId=managed, **share)
        assert refused.value.response["Error"]["Code"] == "InvalidParameter"
    with pytest.raises(ClientError) as refused:
        ec2.modify_snapshot_attribute(
            SnapshotId=snapshot_of(managed), Attribute="createVolumePermission", OperationType="add", UserIds=[account]
        )
    assert refused.value.response["Error"]["Code"] == "OperationNotPermitted"
    ec2.modify_image_attribute(ImageId=managed, LaunchPermission={"Remove": [{"UserId": account}]})
    for image in (customer, plain):
        ec2.modify_image_attribute(ImageId=image, LaunchPermission={"Add": [{"UserId": account}]})
        ec2.modify_snapshot_attribute(
            SnapshotId=snapshot_of(image), Attribute="createVolumePermission", OperationType="add", UserIds=[account]
        )


def test_running_twice_adopts(env: Env) -> None:
    source = env.source()
    first = _run(env, env.plan(source))
    before = env.state(source)
    env.aws.calls.reset()
    second = _run(env, env.plan(source), max_parallel_regions=1)
    assert second.image_ids == first.image_ids
    assert all(r.adopted for r in second.regions)
    assert env.aws.calls["ec2.CopyImage"] == 0
    assert env.state(source) == before and all(len(images) == 1 for images in before.values())


def test_a_copy_pending_past_the_deadline_is_left_to_a_rerun(env: Env) -> None:
    """The wait for a pending copy runs on the Wait's clock: a copy still pending at the deadline (here, after three
    simulated hours) stops the run with a StateError that says to re-run later, and nothing is shared meanwhile."""
    env.copies.pending_looks = 10**6
    source = env.source()
    region = TARGETS[0]
    plan = plan_distribution(source, SOURCE_REGION, [RegionTarget(region, env.keys[region])], run_id="slow")
    clock = Clock()
    wait = Wait(first_delay=1.0, max_delay=30.0, deadline=3 * 3600.0, sleep=clock.sleep, clock=clock)
    with pytest.raises(StateError) as error:
        _run(env, plan, copy_wait=wait)
    assert "pending" in error.value.message and error.value.fix is not None and "re-run" in error.value.fix
    assert 3 * 3600.0 - 30.0 <= clock.now <= 3 * 3600.0 + 30.0
    assert env.aws.calls["ec2.ModifyImageAttribute"] == 0


def test_a_copys_snapshots_are_tagged_at_creation(env: Env) -> None:
    """Killed right after CopyImage answered: the copy's snapshot already carries amiforge:managed and the run, so
    sharing it (ModifySnapshotAttribute) and gc/retire (DeleteSnapshot), which IAM allows only on managed resources,
    work on it, and gc finds it even if no rerun ever comes."""
    source = env.source()
    region = TARGETS[0]
    plan = plan_distribution(source, SOURCE_REGION, [RegionTarget(region, env.keys[region])], run_id="snap")
    env.crash.arm(at=4, when="after")  # DescribeImages (source), DescribeKey, DescribeImages (adopt), CopyImage
    with pytest.raises(Crashed):
        _run(env, plan)
    assert env.crash.crashed == "CopyImage"
    (copy,) = ec2_backends[ACCOUNT][region].amis.values()
    snapshot_tags = backend_tags(copy.ebs_snapshot)
    assert snapshot_tags["amiforge:managed"] == "true" and snapshot_tags["amiforge:run"] == "snap"
    assert snapshot_tags[SOURCE_IMAGE_TAG] == source


def test_an_adopted_copys_untagged_snapshot_is_tagged(env: Env) -> None:
    """A copy made before snapshots were tagged (or by an endpoint that ignored TagSpecifications) converges."""
    source = env.source()
    first = _run(env, env.plan(source))
    for region, image_id in first.image_ids.items():
        snapshot = ec2_backends[ACCOUNT][region].amis[image_id].ebs_snapshot
        keys = [{"Key": key} for key in backend_tags(snapshot)]
        env.ec2(region).delete_tags(Resources=[snapshot.id], Tags=keys)
    assert all(image["snapshot_tags"] == [[]] for r in TARGETS for image in env.state(source)[r])
    again = _run(env, env.plan(source))
    assert all(r.adopted for r in again.regions)
    for region in TARGETS:
        [image] = env.state(source)[region]
        assert image["snapshot_tags"] == [image["tags"]] and ("amiforge:managed", "true") in image["tags"]


def test_nothing_touches_a_copy_before_it_is_available(env: Env) -> None:
    """Copies stay pending for several looks; tags, shares and protection come only once a copy is available."""
    env.copies.pending_looks = 3
    source = env.source()
    touched: list[tuple[str, str]] = []
    writes = {"CreateTags", "ModifyImageAttribute", "ModifySnapshotAttribute", "EnableImageDeregistrationProtection"}

    def check_available(model: Any, params: dict[str, Any], request_signer: Any, **_: Any) -> None:
        if model.name not in writes:
            return
        region = str(request_signer.region_name)
        body = params["body"]
        image_id = body.get("ImageId") or body.get("ResourceId.1") or body.get("SnapshotId")
        amis = ec2_backends[ACCOUNT][region].amis
        image = amis.get(image_id) or next(a for a in amis.values() if a.ebs_snapshot.id == image_id)
        touched.append((model.name, image.state))

    env.aws.session.boto_session.events.register("before-call.ec2", check_available)
    result = _run(env, env.plan(source))
    copies = set(result.image_ids.values())
    assert copies <= env.copies.looked_pending  # DescribeImages did answer pending first
    assert {name for name, _ in touched} == writes
    assert {state for _, state in touched} == {"available"}, touched


# --- the CopyImage emulation: what EC2 documents, and refuses ---------------------------------------------------


def _copy(env: Env, source: str, region: str = TARGETS[0], **kw: Any) -> str:
    request: dict[str, Any] = {"SourceImageId": source, "SourceRegion": SOURCE_REGION, "Name": "copy-1", **kw}
    return str(env.ec2(region).copy_image(**request)["ImageId"])


def _code(env: Env, source: str, **kw: Any) -> str:
    with pytest.raises(ClientError) as caught:
        _copy(env, source, **kw)
    return str(caught.value.response["Error"]["Code"])


def test_copy_emulation_refuses_what_ec2_refuses(env: Env) -> None:
    source = env.source()
    region = TARGETS[0]
    tags = [{"Key": "a", "Value": "1"}]
    assert _code(env, source, KmsKeyId=env.keys[region]) == "InvalidParameterDependency"
    assert _code(env, source, Encrypted=False, KmsKeyId=env.keys[region]) == "InvalidParameterDependency"
    assert _code(env, source, TagSpecifications=[{"ResourceType": "instance", "Tags": tags}]) == "InvalidParameterValue"
    assert _code(env, source, TagSpecifications=[{"Tags": tags}]) == "InvalidParameterValue"
    aws_tag = [{"ResourceType": "image", "Tags": [{"Key": "aws:owner", "Value": "me"}]}]
    assert _code(env, source, TagSpecifications=aws_tag) == "InvalidParameterValue"
    two_places = {"DestinationOutpostArn": "arn:aws:outposts:eu-west-1:123456789012:outpost/op-0123456789abcdef0"}
    two_places["DestinationAvailabilityZone"] = "eu-west-1-lhr-1a"
    assert _code(env, source, **two_places) == "InvalidParameterCombination"
    assert _code(env, source, SnapshotCopyCompletionDurationMinutes=20) == "InvalidParameterValue"
    assert _code(env, source, ClientToken="t" * 65) == "InvalidParameterValue"
    assert ec2_backends[ACCOUNT][region].amis == {}  # a refused request makes nothing
    _copy(env, source)
    assert _code(env, source) == "InvalidAMIName.Duplicate"
    _copy(env, source, region=TARGETS[1])  # a name is unique per region, not across regions
    assert _code(env, "ami-0000000000test01", Name="copy-9") == "InvalidAMIID.NotFound"


def test_copy_emulation_client_token_compares_every_parameter(env: Env) -> None:
    source = env.source()
    region = TARGETS[0]
    request: dict[str, Any] = {
        "ClientToken": "token-1",
        "Description": "d",
        "Encrypted": True,
        "KmsKeyId": env.keys[region],
        "TagSpecifications": [{"ResourceType": "snapshot", "Tags": [{"Key": "a", "Value": "1"}]}],
    }
    first = _copy(env, source, **request)
    assert _copy(env, source, **request) == first  # a retry: the same image, no duplicate-name refusal
    assert len(ec2_backends[ACCOUNT][region].amis) == 1
    for changed in (
        {"Description": "other"},
        {"Name": "copy-2"},
        {"KmsKeyId": env.kms(region).create_key(Description="another")["KeyMetadata"]["Arn"]},
        {"TagSpecifications": [{"ResourceType": "snapshot", "Tags": [{"Key": "a", "Value": "2"}]}]},
        {"CopyImageTags": True},
    ):
        assert _code(env, source, **{**request, **changed}) == "IdempotentParameterMismatch", changed
    assert _copy(env, source, region=TARGETS[1], ClientToken="token-1") != first  # tokens are per region
    assert len(ec2_backends[ACCOUNT][region].amis) == 1


def test_copy_emulation_pending_tags_and_encryption(env: Env) -> None:
    env.copies.pending_looks = 2
    source = env.source()
    ec2_backends[ACCOUNT][SOURCE_REGION].create_tags([source], {"team": "platform"})
    region = TARGETS[0]
    ec2 = env.ec2(region)
    alias = "alias/ebs-copies"
    env.kms(region).create_alias(AliasName=alias, TargetKeyId=env.keys[region])
    image_id = _copy(
        env,
        source,
        Encrypted=True,
        KmsKeyId=alias,
        CopyImageTags=True,
        TagSpecifications=[
            {"ResourceType": "image", "Tags": [{"Key": "kind", "Value": "image"}]},
            {"ResourceType": "snapshot", "Tags": [{"Key": "kind", "Value": "snapshot"}]},
        ],
    )

    def look() -> tuple[str, str, dict[str, Any]]:
        (image,) = ec2.describe_images(ImageIds=[image_id])["Images"]
        snapshot_id = image["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"]
        (snapshot,) = ec2.describe_snapshots(SnapshotIds=[snapshot_id])["Snapshots"]
        return image["State"], snapshot["State"], {"image": image, "snapshot": snapshot}

    assert look()[:2] == ("pending", "pending")
    assert look()[:2] == ("pending", "pending")
    state, snapshot_state, seen = look()
    assert (state, snapshot_state) == ("available", "completed")
    source_tags = {"amiforge:managed": "true", "amiforge:run": "bake-1", "app": "web", "team": "platform"}
    assert {t["Key"]: t["Value"] for t in seen["image"]["Tags"]} == {**source_tags, "kind": "image"}
    assert {t["Key"]: t["Value"] for t in seen["snapshot"]["Tags"]} == {"kind": "snapshot"}
    assert seen["snapshot"]["Encrypted"] is True and seen["snapshot"]["KmsKeyId"] == env.keys[region]  # the ARN

    # An encrypted source gives an encrypted copy even without Encrypted, under the region's AWS-managed key.
    ec2_backends[ACCOUNT][SOURCE_REGION].amis[source].ebs_snapshot.encrypted = True
    plain = _copy(env, source, Name="copy-2")
    copied = ec2_backends[ACCOUNT][region].amis[plain].ebs_snapshot
    assert copied.encrypted is True and copied.kms_key_id == aws_managed_ebs_key(ACCOUNT, region)
    # So does a region that encrypts by default, whatever the source.
    ec2_backends[ACCOUNT][SOURCE_REGION].amis[source].ebs_snapshot.encrypted = False
    other = TARGETS[1]
    env.ec2(other).enable_ebs_encryption_by_default()
    by_default = _copy(env, source, Name="copy-3", region=other)
    copied = ec2_backends[ACCOUNT][other].amis[by_default].ebs_snapshot
    assert copied.encrypted is True and copied.kms_key_id == aws_managed_ebs_key(ACCOUNT, other)
    unencrypted = _copy(env, source, Name="copy-4")  # where nothing encrypts, the copy stays unencrypted
    assert not ec2_backends[ACCOUNT][region].amis[unencrypted].ebs_snapshot.encrypted


def test_copy_emulation_fails_a_copy_under_an_unusable_key_later(env: Env) -> None:
    """EC2 authenticates KmsKeyId asynchronously: CopyImage answers, the copy goes pending, then failed."""
    source = env.source()
    region = TARGETS[0]
    missing = f"arn:aws:kms:{region}:{ACCOUNT}:key/00000000-0000-0000-0000-000000000000"
    image_id = _copy(env, source, Encrypted=True, KmsKeyId=missing)
    ec2 = env.ec2(region)
    states = [ec2.describe_images(ImageIds=[image_id])["Images"][0]["State"] for _ in range(2)]
    assert states == ["pending", "failed"]


def test_the_client_token_alone_prevents_a_duplicate(env: Env) -> None:
    """An endpoint that ignores TagSpecifications, and a crash right after CopyImage answered: the copy exists
    untagged, so adoption cannot find it; the rerun's CopyImage with the same token returns it."""
    env.copies.honour_tags = False
    source = env.source()
    plan = plan_distribution(source, SOURCE_REGION, [RegionTarget(TARGETS[0], env.keys[TARGETS[0]])], run_id="t")
    env.crash.arm(at=4, when="after")  # DescribeImages (source), DescribeKey, DescribeImages (adopt), CopyImage
    with pytest.raises(Crashed):
        _run(env, plan)
    assert env.crash.crashed == "CopyImage"
    env.crash.disarm()
    assert len(ec2_backends[ACCOUNT][TARGETS[0]].amis) == 1
    result = _run(env, plan)
    assert len(ec2_backends[ACCOUNT][TARGETS[0]].amis) == 1
    assert not result.regions[0].adopted
    assert len(env.state(source)[TARGETS[0]]) == 1  # tagged now, through CreateTags


@pytest.mark.parametrize("parallel", [1, 2])
@pytest.mark.parametrize("when", ["before", "after"])
def test_kill_and_resume_after_every_call(env: Env, when: str, parallel: int) -> None:
    """Killed before (the call never happens) or after (it happened, its answer is lost) the K-th API call, for every
    K of a whole run; the rerun converges to the clean run's state. Sequentially, the K-th call is the same operation
    every time, so every kind of call is proven crashed; in parallel the interleaving varies, the property holds."""
    clean_source = env.source("clean")
    env.aws.calls.reset()
    _run(env, env.plan(clean_source, run_id="clean"), max_parallel_regions=parallel)
    calls = sum(env.aws.calls.counts.values())
    clean = env.state(clean_source)
    assert calls >= 12
    crashed: set[str] = set()
    for k in range(1, calls + 1):
        source = env.source(f"crash-{k}")
        plan = env.plan(source, run_id=f"crash-{k}")
        env.crash.arm(at=k, when=when)
        with pytest.raises(Crashed):
            _run(env, plan, max_parallel_regions=parallel)
        env.crash.disarm()
        _run(env, plan, max_parallel_regions=parallel)
        assert _without_run(env.state(source)) == _without_run(clean), (k, env.crash.crashed)
        # No orphan either: an untagged copy would escape the tag filter above, so count every image in the region.
        assert all(len(ec2_backends[ACCOUNT][r].amis) == k + 1 for r in TARGETS), (k, env.crash.crashed)
        crashed.add(str(env.crash.crashed))
    assert parallel > 1 or crashed >= {
        "DescribeImages",
        "DescribeKey",
        "CopyImage",
        "CreateTags",
        "ModifyImageAttribute",
        "ModifySnapshotAttribute",
        "EnableImageDeregistrationProtection",
    }


def _without_run(state: dict[str, Any]) -> dict[str, Any]:
    """A state with what differs from run to run (the run id, the source's name) replaced by placeholders."""

    def anonymous(tags: list[tuple[str, str]]) -> list[tuple[str, str]]:
        return [(key, "<run>" if key == "amiforge:run" else value) for key, value in tags]

    return {
        region: [
            {
                **image,
                "name": "<name>",
                "tags": anonymous(image["tags"]),
                "snapshot_tags": [anonymous(tags) for tags in image["snapshot_tags"]],
            }
            for image in images
        ]
        for region, images in state.items()
    }


def test_throttled_end_state_equals_clean(faulty: Aws, monkeypatch: pytest.MonkeyPatch) -> None:
    assert faulty.faults is not None
    env = _env(faulty, monkeypatch)
    faulty.faults.not_found_reads = 0  # the source was baked long ago; only the copies are fresh
    source = env.source()
    faulty.faults.not_found_reads = 1
    result = _run(env, env.plan(source))
    again = _run(env, env.plan(source))
    assert again.image_ids == result.image_ids
    assert faulty.faults.injected["RequestLimitExceeded"] > 3
    assert faulty.faults.injected["InvalidAMIID.NotFound"] >= 1  # the fresh copies were waited for
    state = env.state(source)
    assert all(len(state[r]) == 1 and state[r][0]["protected"] and state[r][0]["kms"] == [env.keys[r]] for r in TARGETS)
    launch = "".join(state[TARGETS[0]][0]["launch"])
    assert ORG in launch and OU in launch and all(a in launch for a in SHARE_ACCOUNTS)
