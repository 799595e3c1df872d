"""gc on moto: what counts as an orphan (every rule), what is kept and why, the order and outcomes of apply, the
blast-radius cap, convergence after a partial apply, paging and call counts, and the same end state under faults.

Resources are made with boto3 directly and tagged at creation; their ages are set in moto's backend against a fixed
`NOW`. gc_fixtures.py emulates what moto lacks here (DescribeVolumes paging, the snapshot-id image filter).
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs

import pytest
from conftest import ACCOUNT, REGION, Aws
from gc_fixtures import SNAPSHOT_FILTER, AnyOf, install_gc_emulation
from moto import mock_aws
from moto.ec2.models import ec2_backends
from moto.ec2.utils import is_filter_matching
from moto_emulation import PagingEmulation, error_response

from amiforge.awsapi.clients import AwsSession
from amiforge.errors import ConfigError, GateFailed
from amiforge.providers.aws.gc import DEFAULT_MIN_AGE, GcPlan, GcResult, Orphan, RunState, apply_gc, plan_gc
from amiforge.providers.aws.ssh import new_key_pair

NOW = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
OLD = NOW - timedelta(days=2)
YOUNG = NOW - timedelta(minutes=10)
DONE, DONE_TOO, BUSY, ELSEWHERE, STRAY = "run-done", "run-done-2", "run-busy", "run-elsewhere", "run-stray"
RUNS: dict[str, RunState] = {DONE: "finished", DONE_TOO: "finished", BUSY: "active"}  # ELSEWHERE: unknown
OTHER_ACCOUNT = "210987654321"  # synthetic
MANAGED, RUN = "amiforge:managed", "amiforge:run"
# Key pairs are named (their gc id is the name); what the SSH communicator imports is an OpenSSH public key.
KEY_PAIR_PREFIX = "amiforge-"
PUBLIC_KEY = new_key_pair("gc-test")[1].encode()
# Where an injected fault's request is pointed so moto never executes it (as moto_emulation.FaultInjector does).
_NOWHERE = "https://amiforge-injected-fault.invalid/"


@pytest.fixture(autouse=True)
def gc_emulation(paging: PagingEmulation, monkeypatch: pytest.MonkeyPatch) -> None:
    install_gc_emulation(paging, monkeypatch)


def tags(run: str | None = None, *, managed: str | None = "true", **extra: str) -> list[dict[str, str]]:
    out = {**({MANAGED: managed} if managed is not None else {}), **({RUN: run} if run is not None else {}), **extra}
    return [{"Key": k, "Value": v} for k, v in out.items()]


class Registry:
    """run_state for the tests: RUNS, anything else unknown; counts what it is asked."""

    def __init__(self, runs: dict[str, RunState] | None = None) -> None:
        self.runs = RUNS if runs is None else runs
        self.asked: Counter[str] = Counter()

    def __call__(self, run: str) -> RunState:
        self.asked[run] += 1
        return self.runs.get(run, "unknown")


class World:
    """Resources made with boto3, each under a label, so plans from different worlds (ids differ) compare."""

    def __init__(self, aws: Aws) -> None:
        self.ec2: Any = aws.ec2()
        self.backend = ec2_backends[ACCOUNT][REGION]
        self.ids: dict[str, str] = {}
        self._base: str | None = None

    def _keep(self, label: str, resource_id: str) -> str:
        assert label not in self.ids
        self.ids[label] = resource_id
        return resource_id

    @property
    def base(self) -> str:
        """An untagged instance the test images are made from."""
        if self._base is None:
            self._base = self._run([])
        return self._base

    def _run(self, specs: list[dict[str, Any]]) -> str:
        answer = self.ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1, TagSpecifications=specs)
        return str(answer["Instances"][0]["InstanceId"])

    def instance(self, label: str, t: list[dict[str, str]], *, at: datetime = OLD, state: str | None = None) -> str:
        specs = [{"ResourceType": "instance", "Tags": t}] if t else []
        instance_id = self._keep(label, self._run(specs))
        instance = self.backend.get_instance(instance_id)
        instance.launch_time = at
        if state is not None:
            instance._state.name = state  # moto has no API to hold an instance in a transitional state
        return instance_id

    def image(
        self, label: str, t: list[dict[str, str]], *, at: datetime = OLD, snapshot: list[dict[str, str]] | None = None
    ) -> str:
        """An image, and its snapshot under `<label>/snap`, tagged `snapshot` (moto: not in CreateImage)."""
        specs = [{"ResourceType": "image", "Tags": t}] if t else []
        image_id = self._keep(
            label, str(self.ec2.create_image(InstanceId=self.base, Name=label, TagSpecifications=specs)["ImageId"])
        )
        ami = self.backend.amis[image_id]
        ami.creation_date = at
        snapshot_id = self._keep(f"{label}/snap", str(ami.ebs_snapshot.id))
        self.backend.snapshots[snapshot_id].start_time = at
        if snapshot:
            self.ec2.create_tags(Resources=[snapshot_id], Tags=snapshot)
        return image_id

    def snapshot(self, label: str, t: list[dict[str, str]], *, at: datetime = OLD) -> str:
        volume = self.ec2.create_volume(Size=1, AvailabilityZone=f"{REGION}a")["VolumeId"]
        specs = [{"ResourceType": "snapshot", "Tags": t}] if t else []
        snapshot_id = self._keep(
            label, str(self.ec2.create_snapshot(VolumeId=volume, TagSpecifications=specs)["SnapshotId"])
        )
        self.ec2.delete_volume(VolumeId=volume)
        self.backend.snapshots[snapshot_id].start_time = at
        return snapshot_id

    def key_pair(self, label: str, t: list[dict[str, str]], *, at: datetime = OLD) -> str:
        """A key pair as the SSH communicator imports one (tagged at creation), named `amiforge-<label>`."""
        name = self._keep(label, f"{KEY_PAIR_PREFIX}{label}")
        specs = [{"ResourceType": "key-pair", "Tags": t}] if t else []
        self.ec2.import_key_pair(KeyName=name, PublicKeyMaterial=PUBLIC_KEY, TagSpecifications=specs)
        self.backend.key_pairs[name].create_time = at
        return name

    def volume(self, label: str, t: list[dict[str, str]], *, at: datetime = OLD) -> str:
        specs = [{"ResourceType": "volume", "Tags": t}] if t else []
        volume = self.ec2.create_volume(Size=1, AvailabilityZone=f"{REGION}a", TagSpecifications=specs)
        volume_id = self._keep(label, str(volume["VolumeId"]))
        self.backend.volumes[volume_id].create_time = at
        return volume_id

    def all_of(self, prefix: str, run: str, *, at: datetime = OLD) -> None:
        """One of each kind for `run`: an instance, an image with its tagged snapshot, a snapshot, a volume."""
        self.instance(f"{prefix}-instance", tags(run), at=at)
        self.image(f"{prefix}-image", tags(run), at=at, snapshot=tags(run))
        self.snapshot(f"{prefix}-snapshot", tags(run), at=at)
        self.volume(f"{prefix}-volume", tags(run), at=at)

    # --- reading -----------------------------------------------------------------------------------------------

    def label(self, resource_id: str) -> str:
        return {v: k for k, v in self.ids.items()}[resource_id]

    def orphans(self, plan: GcPlan) -> list[str]:
        return [self.label(o.id) for o in plan.orphans]

    def kept(self, plan: GcPlan) -> dict[str, str]:
        return {self.label(i): why for i, why in plan.kept}

    def exists(self, label: str) -> bool:
        resource_id = self.ids[label]
        if resource_id.startswith("i-"):
            return self.backend.get_instance(resource_id).state not in ("terminated", "shutting-down")
        if resource_id.startswith("ami-"):
            return resource_id in self.backend.amis
        if resource_id.startswith("snap-"):
            return resource_id in self.backend.snapshots
        if resource_id.startswith(KEY_PAIR_PREFIX):
            return resource_id in self.backend.key_pairs
        return resource_id in self.backend.volumes

    def existing(self) -> set[str]:
        return {label for label in self.ids if self.exists(label)}


def plan(
    aws: Aws, registry: Registry | None = None, registered: tuple[str, ...] = (), min_age: timedelta = DEFAULT_MIN_AGE
) -> GcPlan:
    return plan_gc(
        aws.session, REGION, registered_images=registered, run_state=registry or Registry(), now=NOW, min_age=min_age
    )


# --- what is an orphan ------------------------------------------------------------------------------------------


def test_only_both_tags_and_a_finished_run_make_an_orphan(aws: Aws) -> None:
    world = World(aws)
    world.all_of("done", DONE)
    world.all_of("busy", BUSY)
    world.all_of("elsewhere", ELSEWHERE)
    # Never looked at: one tag missing, a managed tag that is not "true", no tags at all.
    for name, t in {
        "no-run": tags(None),
        "no-managed": tags(STRAY, managed=None),
        "managed-false": tags(STRAY, managed="false"),
        "untagged": [],
    }.items():
        world.instance(f"{name}-instance", t)
        world.image(f"{name}-image", t, snapshot=t)
        world.snapshot(f"{name}-snapshot", t)
        world.volume(f"{name}-volume", t)

    requests: list[tuple[str, dict[str, Any]]] = []

    def record(params: dict[str, Any], model: Any, **_: Any) -> None:
        requests.append((model.name, params))

    world.ec2.meta.events.register("provide-client-params.ec2", record)
    registry = Registry()
    result = plan(aws, registry)

    assert sorted(world.orphans(result)) == [
        "done-image",
        "done-image/snap",
        "done-instance",
        "done-snapshot",
        "done-volume",
    ]
    assert [o.kind for o in result.orphans] == ["instance", "image", "snapshot", "snapshot", "volume"]  # apply order
    kept = world.kept(result)
    for kind in ("instance", "image", "image/snap", "snapshot", "volume"):
        assert kept[f"busy-{kind}"] == f"run {BUSY} is still active"
        assert kept[f"elsewhere-{kind}"] == f"run {ELSEWHERE} is not in this registry"
    assert len(kept) == 10, "nothing partially tagged or untagged is listed at all"
    # One registry lookup per run, and none for runs only untagged-enough resources name.
    assert registry.asked == {DONE: 1, BUSY: 1, ELSEWHERE: 1}
    by_id = {o.id: o for o in result.orphans}
    instance = by_id[world.ids["done-instance"]]
    assert (instance.kind, instance.run_id, instance.state, instance.created) == ("instance", DONE, "running", OLD)
    assert instance.region == REGION and "finished" in instance.reason
    assert by_id[world.ids["done-image/snap"]].backs == (world.ids["done-image"],)

    # The filtering is EC2's: every listing asks for both tags; the one other call asks about candidate snapshots.
    tag_filters = [{"Name": f"tag:{MANAGED}", "Values": ["true"]}, {"Name": "tag-key", "Values": [RUN]}]
    listings = [(op, p) for op, p in requests if not any(f["Name"] == SNAPSHOT_FILTER for f in p.get("Filters", []))]
    assert sorted(op for op, _ in listings) == [
        "DescribeImages",
        "DescribeInstances",
        "DescribeKeyPairs",
        "DescribeSnapshots",
        "DescribeVolumes",
    ]
    for _op, params in listings:
        assert all(f in params["Filters"] for f in tag_filters), params
    (usage,) = [p for op, p in requests if (op, p) not in listings]
    ((name, values),) = [(f["Name"], f["Values"]) for f in usage["Filters"]]
    assert name == SNAPSHOT_FILTER and sorted(values) == sorted(
        [world.ids["done-image/snap"], world.ids["done-snapshot"]]
    )


def test_registered_images_and_their_snapshots_are_never_orphans(aws: Aws) -> None:
    world = World(aws)
    artifact = world.image("artifact", tags(DONE), snapshot=tags(DONE))
    # A registered artifact whose image is already deregistered (retire's grace period): its snapshot stays.
    retiring = world.image("retiring", tags(DONE), snapshot=tags(DONE))
    world.ec2.deregister_image(ImageId=retiring)
    # The same, not registered: its snapshot is an orphan.
    world.image("failed-run", tags(DONE), snapshot=tags(DONE))
    world.ec2.deregister_image(ImageId=world.ids["failed-run"])

    result = plan(aws, registered=(artifact, retiring))
    assert world.orphans(result) == ["failed-run/snap"]
    assert result.orphans[0].reason == f"run {DONE} finished; backs no image"
    kept = world.kept(result)
    assert kept["artifact"] == "a registered artifact (retire removes it, never gc)"
    assert kept["artifact/snap"] == f"created for registered image {artifact}"
    assert kept["retiring/snap"] == f"created for registered image {retiring}"


def test_snapshots_backing_any_existing_image_are_never_deleted(aws: Aws) -> None:
    world = World(aws)
    # Someone else's public image on our (tagged) snapshot.
    theirs = world.image("theirs", [], snapshot=tags(DONE))
    world.backend.amis[theirs].owner_id = OTHER_ACCOUNT
    world.ec2.modify_image_attribute(ImageId=theirs, LaunchPermission={"Add": [{"Group": "all"}]})
    # Our own image without amiforge's tags, and an image gc keeps (active run), both on tagged snapshots.
    untagged = world.image("untagged", [], snapshot=tags(DONE))
    busy = world.image("busy", tags(BUSY), snapshot=tags(DONE))
    # An orphaned image whose snapshot is not tagged: the image goes, the snapshot is never touched.
    world.image("orphan", tags(DONE))

    result = plan(aws)
    assert world.orphans(result) == ["orphan"]
    kept = world.kept(result)
    assert kept["theirs/snap"] == f"backs image {theirs}, which is not removed"
    assert kept["untagged/snap"] == f"backs image {untagged}, which is not removed"
    assert kept["busy/snap"] == f"backs image {busy}, which is not removed"
    assert kept["orphan/snap"].startswith(f"backs orphaned image {world.ids['orphan']} but is not tagged")

    assert apply_gc(aws.session, result).ok
    assert world.existing() == set(world.ids) - {"orphan"}


def test_deregistration_protection_keeps_an_image_and_its_snapshots(aws: Aws) -> None:
    world = World(aws)
    protected = world.image("protected", tags(DONE), snapshot=tags(DONE))
    # moto 5.2.5 cannot enable protection (NotImplementedError); its DescribeImages reports the attribute if set,
    # though its Ami class does not declare it (hence the ignore).
    world.backend.amis[protected].deregistration_protection = "enabled-without-cooldown"  # type: ignore[attr-defined]
    result = plan(aws)
    assert result.orphans == ()
    kept = world.kept(result)
    assert kept["protected"].startswith("deregistration protection is enabled-without-cooldown")
    assert kept["protected/snap"] == f"backs image {protected}, which is not removed"


def test_young_resources_may_belong_to_a_running_bake(aws: Aws) -> None:
    world = World(aws)
    world.all_of("young", DONE, at=YOUNG)
    world.all_of("edge", DONE_TOO, at=NOW - timedelta(hours=1))  # exactly min_age old: not younger
    result = plan(aws)
    assert sorted(world.orphans(result)) == sorted(label for label in world.ids if label.startswith("edge"))
    kept = world.kept(result)
    assert {label for label in kept} == {label for label in world.ids if label.startswith("young")}
    assert kept["young-image/snap"] == "created 10m00s ago, less than 1h00m: may still be in use by a running bake"
    assert all("may still be in use by a running bake" in why for why in kept.values())
    shorter = plan(aws, min_age=timedelta(minutes=5))
    assert len(shorter.orphans) == 10 and shorter.kept == ()


def test_instances_by_state(aws: Aws) -> None:
    world = World(aws)
    for state in ("pending", "running", "stopping", "stopped", "shutting-down", "terminated"):
        world.instance(state, tags(DONE), state=state)
    result = plan(aws)
    assert world.orphans(result) == sorted(["pending", "running", "stopping", "stopped"], key=world.ids.__getitem__)
    assert {o.state for o in result.orphans} == {"pending", "running", "stopping", "stopped"}
    assert result.kept == ()  # terminated and shutting-down ones are not even listed


def test_images_and_snapshots_by_state(aws: Aws) -> None:
    world = World(aws)
    world.image("disabled", tags(DONE))
    world.ec2.disable_image(ImageId=world.ids["disabled"])  # disabled images are listed only when asked for
    pending = world.image("pending", tags(DONE), snapshot=tags(DONE))
    world.backend.amis[pending].state = "pending"
    creating = world.snapshot("creating", tags(DONE))
    world.backend.snapshots[creating].status = "pending"
    result = plan(aws)
    assert world.orphans(result) == ["disabled"]
    assert world.kept(result) == {
        "disabled/snap": f"backs orphaned image {world.ids['disabled']} but is not tagged amiforge:managed=true and "
        "amiforge:run: gc never deletes it (delete it by hand once the image is gone)",
        "pending": "the image is pending: still being created or copied",
        "pending/snap": f"backs image {pending}, which is not removed",
        "creating": "the snapshot is pending",
    }


def test_volumes_only_when_not_attached(aws: Aws) -> None:
    world = World(aws)
    world.volume("loose", tags(DONE))
    attached = world.volume("attached", tags(DONE))
    world.ec2.attach_volume(VolumeId=attached, InstanceId=world.base, Device="/dev/sdf")
    result = plan(aws)
    assert world.orphans(result) == ["loose"]
    assert world.kept(result) == {"attached": f"attached to {world.base}"}


def test_key_pairs_a_killed_run_left(aws: Aws) -> None:
    """The SSH communicator's throw-away key pairs (tagged at import) follow the rules every kind does: both tags, a
    finished run of this registry, old enough. One DescribeKeyPairs, filtered on both tags by EC2."""
    world = World(aws)
    world.key_pair("done", tags(DONE))
    world.key_pair("busy", tags(BUSY))
    world.key_pair("elsewhere", tags(ELSEWHERE))
    world.key_pair("young", tags(DONE_TOO), at=YOUNG)
    world.key_pair("no-run", tags(None))
    world.key_pair("managed-false", tags(STRAY, managed="false"))
    world.key_pair("untagged", [])
    requests: list[dict[str, Any]] = []
    world.ec2.meta.events.register(
        "provide-client-params.ec2.DescribeKeyPairs", lambda params, **_: requests.append(params)
    )
    aws.calls.reset()

    result = plan(aws)
    assert world.orphans(result) == ["done"]
    (orphan,) = result.orphans
    assert (orphan.kind, orphan.id, orphan.run_id, orphan.created) == ("key-pair", "amiforge-done", DONE, OLD)
    assert orphan.reason == f"run {DONE} finished; its throw-away key pair was not deleted"
    assert world.kept(result) == {
        "busy": f"run {BUSY} is still active",
        "elsewhere": f"run {ELSEWHERE} is not in this registry",
        "young": "created 10m00s ago, less than 1h00m: may still be in use by a running bake",
    }
    (listing,) = requests
    assert listing["Filters"] == [
        {"Name": "tag:amiforge:managed", "Values": ["true"]},
        {"Name": "tag-key", "Values": [RUN]},
    ]
    assert aws.calls["ec2.DescribeKeyPairs"] == 1


def test_key_pairs_go_last_and_a_gone_or_recreated_one_is_not_deleted(aws: Aws) -> None:
    """Key pairs go after everything else; EC2 answers DeleteKeyPair of a missing name with success, so a key pair
    already gone is reported `gone`, and one re-created under the name without amiforge's tags is left alone."""
    world = World(aws)
    world.instance("instance", tags(DONE))
    world.volume("volume", tags(DONE))
    world.key_pair("builder-key", tags(DONE))
    world.key_pair("tester-key", tags(DONE))
    result = plan(aws)
    assert [o.kind for o in result.orphans] == ["instance", "volume", "key-pair", "key-pair"]
    made = _destructive_calls(world)
    first = apply_gc(aws.session, result)
    assert first.ok and [o.outcome for o in first.outcomes] == ["deleted"] * 4
    assert [op for op, _ in made] == ["TerminateInstances", "DeleteVolume", "DeleteKeyPair", "DeleteKeyPair"]
    assert not world.exists("builder-key") and not world.exists("tester-key")

    # Someone imports a key pair of the same name, without amiforge's tags: applying the plan again must not touch it.
    world.ec2.import_key_pair(KeyName=world.ids["tester-key"], PublicKeyMaterial=PUBLIC_KEY)
    made.clear()
    second = apply_gc(aws.session, result)
    assert second.ok and [o.outcome for o in second.outcomes] == ["gone"] * 4
    assert second.outcomes[-1].detail.startswith("already gone")
    assert "DeleteKeyPair" not in {op for op, _ in made} and world.exists("tester-key")


def test_snapshot_filter_emulation_matches_any_of_an_images_snapshots() -> None:
    class Image:
        def get_filter_value(self, name: str) -> Any:
            return AnyOf(["snap-0000000a", "snap-0000000b"])

    assert is_filter_matching(Image(), SNAPSHOT_FILTER, ["snap-0000000b"])
    assert is_filter_matching(Image(), SNAPSHOT_FILTER, ["snap-0000000c", "snap-0000000a"])
    assert not is_filter_matching(Image(), SNAPSHOT_FILTER, ["snap-0000000c", "snap-0000000d"])


def test_config_errors() -> None:
    # Each is refused before any call; under moto all the same, so a change of order can never reach AWS.
    with mock_aws():
        session = AwsSession(REGION)
        with pytest.raises(ConfigError, match="timezone-aware"):
            plan_gc(session, REGION, registered_images=(), run_state=Registry(), now=datetime(2024, 6, 1))
        with pytest.raises(ConfigError, match="negative"):
            plan_gc(session, REGION, registered_images=(), run_state=Registry(), now=NOW, min_age=timedelta(-1))
        with pytest.raises(ConfigError, match="negative"):
            apply_gc(session, GcPlan(REGION, (), ()), max_deletions=-1)


# --- applying ---------------------------------------------------------------------------------------------------


def _leftovers(world: World) -> None:
    """A failed run's leftovers (two images: 6 orphans), beside what gc keeps."""
    world.instance("instance", tags(DONE))
    world.image("image-a", tags(DONE), snapshot=tags(DONE))
    world.image("image-b", tags(DONE), snapshot=tags(DONE))
    world.volume("volume", tags(DONE))
    world.all_of("busy", BUSY)
    world.image("artifact", tags(DONE), snapshot=tags(DONE))


def _destructive_calls(world: World) -> list[tuple[str, str]]:
    made: list[tuple[str, str]] = []

    def record(params: dict[str, Any], model: Any, **_: Any) -> None:
        if not model.name.startswith("Describe"):
            named = ("ImageId", "SnapshotId", "VolumeId", "KeyName", "KeyPairId")
            ids = [*params.get("InstanceIds", []), *(params.get(k) for k in named)]
            made.append((model.name, next(str(i) for i in ids if i)))

    world.ec2.meta.events.register("provide-client-params.ec2", record)
    return made


def test_apply_removes_in_a_safe_order_and_reports_each_outcome(aws: Aws) -> None:
    world = World(aws)
    _leftovers(world)
    registered = (world.ids["artifact"],)
    result = plan(aws, registered=registered)
    assert sorted(world.orphans(result)) == ["image-a", "image-a/snap", "image-b", "image-b/snap", "instance", "volume"]
    made = _destructive_calls(world)
    heard: list[tuple[Orphan, str]] = []
    outcome = apply_gc(aws.session, result, on_progress=lambda o, what: heard.append((o, what)))

    assert [world.label(resource) for _, resource in made] == world.orphans(result)
    ops = [op for op, _ in made]
    assert ops == [
        "TerminateInstances",
        "DeregisterImage",
        "DeregisterImage",
        "DeleteSnapshot",
        "DeleteSnapshot",
        "DeleteVolume",
    ]
    assert heard == [(o, "deleted") for o in result.orphans]
    assert outcome.ok and [o.outcome for o in outcome.outcomes] == ["deleted"] * 6
    assert [o.detail for o in outcome.outcomes][:2] == ["terminated", "deregistered"]
    gone = {"instance", "image-a", "image-a/snap", "image-b", "image-b/snap", "volume"}
    assert world.existing() == set(world.ids) - gone
    # Nothing is left to do; the terminated instance is not even listed.
    again = plan(aws, registered=registered)
    assert again.orphans == () and {world.label(i) for i, _ in again.kept} == {
        label for label in world.ids if label.startswith(("busy", "artifact"))
    }


def test_blast_radius_cap_refuses_before_touching_anything(aws: Aws) -> None:
    world = World(aws)
    for i in range(11):
        world.volume(f"volume-{i:02}", tags(DONE))
    result = plan(aws)
    assert len(result.orphans) == 11
    aws.calls.reset()

    def with_the_default_cap() -> GcResult:
        return apply_gc(aws.session, result)

    def with_a_cap_of_10() -> GcResult:
        return apply_gc(aws.session, result, max_deletions=10)

    for refusal in (with_the_default_cap, with_a_cap_of_10):
        with pytest.raises(GateFailed) as refused:
            refusal()
        assert refused.value.gate == "blast radius" and len(refused.value.failures) == 11
        assert refused.value.fix is not None and "at least 11" in refused.value.fix
    assert not aws.calls.counts, "refused before any API call"
    assert world.existing() == set(world.ids)
    assert apply_gc(aws.session, result, max_deletions=11).ok
    assert world.existing() == set()


def test_applying_the_same_plan_again_converges(aws: Aws) -> None:
    world = World(aws)
    _leftovers(world)
    result = plan(aws, registered=(world.ids["artifact"],))
    first = apply_gc(aws.session, result)
    after_first = world.existing()
    second = apply_gc(aws.session, result)
    assert first.ok and second.ok
    assert [o.outcome for o in second.outcomes] == ["gone"] * 6
    assert second.outcomes[0].detail == "already terminated"
    assert world.existing() == after_first


def _refuse(world: World, operation: str, resource_id: str) -> Any:
    """Answer `operation` on `resource_id` with UnauthorizedOperation (as a tag-conditioned policy would)."""

    def handler(request: Any, **_: Any) -> Any:
        body = request.body.decode() if isinstance(request.body, bytes) else str(request.body or "")
        if resource_id in {v[0] for v in parse_qs(body).values()}:
            response = error_response(request.url, "ec2", "UnauthorizedOperation")
            request.url = _NOWHERE
            return response
        return None

    world.ec2.meta.events.register_first(f"before-send.ec2.{operation}", handler)
    return handler


def test_a_partial_failure_is_reported_and_a_rerun_converges(aws: Aws) -> None:
    world = World(aws)
    _leftovers(world)
    world.volume("volume-2", tags(DONE))
    result = plan(aws, registered=(world.ids["artifact"],))
    refusals = [
        ("DeregisterImage", _refuse(world, "DeregisterImage", world.ids["image-a"])),
        ("DeleteVolume", _refuse(world, "DeleteVolume", world.ids["volume"])),
    ]
    first = apply_gc(aws.session, result)
    outcomes = {world.label(o.orphan.id): o for o in first.outcomes}
    assert {label: o.outcome for label, o in outcomes.items()} == {
        "instance": "deleted",
        "image-a": "failed",
        "image-b": "deleted",
        "image-a/snap": "skipped",  # never before its image
        "image-b/snap": "deleted",
        "volume": "failed",
        "volume-2": "deleted",  # past the failure
    }
    assert not first.ok and len(first.with_outcome("failed")) == 2
    failure = outcomes["image-a"]
    assert failure.error is not None and "ec2:DeregisterImage" in failure.detail and "fix:" in failure.detail
    assert outcomes["image-a/snap"].detail.startswith(f"image {world.ids['image-a']} is not deregistered")
    assert world.exists("image-a") and world.exists("image-a/snap") and world.exists("volume")

    for operation, handler in refusals:
        world.ec2.meta.events.unregister(f"before-send.ec2.{operation}", handler)
    second = apply_gc(aws.session, result)
    assert second.ok
    assert {world.label(o.orphan.id): o.outcome for o in second.outcomes} == {
        "instance": "gone",
        "image-a": "deleted",
        "image-b": "gone",
        "image-a/snap": "deleted",
        "image-b/snap": "gone",
        "volume": "deleted",
        "volume-2": "gone",
    }
    assert plan(aws, registered=(world.ids["artifact"],)).orphans == ()


@pytest.mark.parametrize("fixture", ["aws", "faulty"])
def test_same_plan_and_end_state_under_faults(request: pytest.FixtureRequest, fixture: str) -> None:
    aws: Aws = request.getfixturevalue(fixture)
    world = World(aws)
    _leftovers(world)
    world.all_of("elsewhere", ELSEWHERE)
    world.all_of("young", DONE_TOO, at=YOUNG)
    result = plan(aws, registered=(world.ids["artifact"],))
    assert sorted(world.orphans(result)) == ["image-a", "image-a/snap", "image-b", "image-b/snap", "instance", "volume"]
    assert len(result.kept) == 17
    applied = apply_gc(aws.session, result)
    assert applied.ok and len(applied.with_outcome("deleted")) == 6
    assert world.existing() == set(world.ids) - set(world.orphans(result))
    if aws.faults is not None:
        assert aws.faults.injected["RequestLimitExceeded"] > 0


# --- paging and cost --------------------------------------------------------------------------------------------


def test_page_size_does_not_change_the_plan(aws: Aws) -> None:
    world = World(aws)
    for i in range(3):
        world.all_of(f"done-{i}", DONE)
        world.all_of(f"busy-{i}", BUSY)
    plans: dict[int, GcPlan] = {}
    for size in (1, 1000):
        aws.paging.page_cap = size
        aws.calls.reset()
        plans[size] = plan(aws)
        # 6 instances, 6 images, 12 snapshots, 6 volumes listed; the 6 candidate snapshots are used by 3 images.
        # DescribeKeyPairs has no pages: one call.
        pages = {"DescribeInstances": 6, "DescribeImages": 6 + 3, "DescribeSnapshots": 12, "DescribeVolumes": 6}
        expected = (pages if size == 1 else dict.fromkeys(pages, 1) | {"DescribeImages": 2}) | {"DescribeKeyPairs": 1}
        assert {op: n for (_, op), n in aws.calls.counts.items()} == expected
    assert plans[1] == plans[1000]
    assert len(plans[1].orphans) == 15 and len(plans[1].kept) == 15


def test_calls_grow_with_pages_not_resources(aws: Aws) -> None:
    world = World(aws)
    registry = Registry()
    counts: list[Counter[tuple[str, str]]] = []
    for n in (2, 40):
        while sum(label.endswith("-instance") for label in world.ids) < n:
            world.all_of(f"done-{len(world.ids)}", DONE)
        aws.calls.reset()
        registry.asked.clear()
        result = plan(aws, registry)
        assert len(result.orphans) == 5 * n
        assert registry.asked == {DONE: 1}
        counts.append(Counter(aws.calls.counts))
    assert counts[0] == counts[1]
    assert sum(counts[1].values()) == 6  # one page per listing, and one snapshot-usage lookup
