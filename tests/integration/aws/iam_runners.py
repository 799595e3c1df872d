"""One runner per declared IAM operation: the operation's real code path under moto, the AWS calls it made, and
whether IAM would allow each of them on AWS.

`observe(operation, work)` runs `RUNNERS[operation]` in a fresh moto (its own emulations, its own boto3 session) and
returns every AWS call amiforge made for the operation — after the runner's setup, which `Harness.begin()` marks —
as an `ObservedCall`: its IAM action, its call site and why IAM would refuse it. test_iam.py checks those against
iam.PERMISSIONS and against the call sites the source has (aws_call_sites.py).

**Call sites** are named as aws_call_sites names them, `amiforge/…/file.py:line`: the innermost amiforge frame that
is not a call form — awsapi.clients' call, paginate and eventually, waiting.py's loops, and the wrappers the static
reader found (`CallSites.call_forms`: gc's `_listed`, fleet's `asg_call`, doctor's `_ask`/`_pages`). `paginate` is a
generator whose requests happen wherever it is consumed, so while a runner runs every module's `paginate` is a
wrapper that remembers the line that called it, and its pages are attributed there.

**IAM**: moto enforces none. `Harness.begin()` arms the recorder with `iam.policy_document([operation], …)` (the
runner's `policy_args`: signing keys, the roles passed); from then on each call is turned into what IAM authorises
for it (`authorisations`) — the call itself on its resources, with their tags read from moto's backends *before* the
call, and what IAM checks on amiforge's behalf: tags given at creation (ec2:CreateTags with ec2:CreateAction), the
instance profile's role passed to EC2 (also by Auto Scaling writes that point a group at a launch template version:
RunInstances and the template's role, against the caller), and an EBS key used by EC2 (RunInstances, CopyImage)
or by the EBS direct APIs (GetSnapshotBlock) — asked as if that key were a customer managed one, the case the KMS
declarations are for — and each is evaluated against the policy (iam_evaluation.py). A refusal is kept on the call,
with the reason.

Runners drive what the command drives (the provider's methods where it has them) through the emulations the other
AWS tests use (asg_emulation, create_image_emulation, distribute_fixtures, ebs_emulation, gc_fixtures, fake_machine,
runcommand_emulation's Xen console). What each must reach:
- bake: a bake that succeeds, one whose step fails (the builder is terminated), one whose image never becomes
  available (the unfinished image is deregistered and its snapshots deleted: `_discard_unfinished`), from both kinds
  of source (owners, SSM parameter);
- bake and boot-test, with each communicator: SSM through a `ShadowedMachine` (the real `SsmMachine` sends every
  command against moto, which answers Success with no output, while a `FakeMachine` supplies what the guest would
  have answered), so SSM Run Command is attributed to the operations that use it, as on AWS; SSH through the real
  key-pair and host-key wiring with a FakeMachine for the connection (no sshd here), once with a key pair an earlier
  attempt of the run left (replaced). The serial console is read by the real ConsoleReader: `SerialConsole` answers
  GetConsoleOutput as EC2 does (moto's console is fixed text), with cloud-init's host keys and the readiness line;
  for a Xen instance type EC2 refuses Latest=true (`XenConsole`) and the reader falls back.
"""

from __future__ import annotations

import base64
import functools
import inspect
import json
import posixpath
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import boto3
import pytest
from asg_emulation import FakeTime, InstanceRefreshEmulation, install_asg_emulation, make_group
from aws_call_sites import action_of, find_call_sites
from botocore.awsrequest import AWSResponse
from conftest import ACCOUNT, REGION, Aws
from create_image_emulation import SnapshotTagsAtCreation
from distribute_fixtures import CopyImageEmulation, DeregistrationProtection
from doctor_emulation import DoctorEmulation, internet_for_default_vpc
from ebs_emulation import EbsEmulation
from fake_machine import READY, Clock, FakeMachine
from gc_fixtures import install_gc_emulation
from iam_evaluation import ContextValue, Request, refusal
from moto import mock_aws
from moto.autoscaling.models import autoscaling_backends
from moto.ec2.models import ec2_backends
from moto.ec2.models.instance_types import INSTANCE_TYPES
from moto.iam.models import get_account_id_from, iam_backends
from moto.kms.models import kms_backends
from moto_emulation import ApiCalls, PagingEmulation, error_response, fast_tag_lookup, shared_images
from retire_emulation import ImageLifecycle
from runcommand_emulation import XenConsole

import amiforge
import amiforge.providers
from amiforge.awsapi import clients
from amiforge.awsapi.clients import AwsSession
from amiforge.errors import InfraError
from amiforge.lifecycle import retire
from amiforge.lifecycle.sign import check_artifact_bytes
from amiforge.model import Artifact, ImageVersion, Status
from amiforge.policy.retention import Retention
from amiforge.providers.aws.fleet import AsgFleet
from amiforge.providers.aws.gc import apply_gc, plan_gc
from amiforge.providers.aws.iam import ROLLOUT_GROUP_WRITES, TAG_ON_CREATE, policy_document
from amiforge.providers.aws.images import MANAGED_TAG, describe_image, inventory, resolve_source
from amiforge.providers.aws.instances import RUN_TAG, SshConnect
from amiforge.providers.aws.key_policy import SHARE_ACTIONS
from amiforge.providers.aws.machine import CommandResult, Leftovers, Machine, MachineFactory, SsmMachine
from amiforge.providers.aws.provider import AwsProvider, artifact_of
from amiforge.providers.aws.refresh import refresh_status, roll_back_refresh, start_refresh
from amiforge.providers.aws.ssh import HOST_KEYS_BEGIN, HOST_KEYS_END, new_key_pair
from amiforge.providers.interface import Cleanups, Release, Replacement, RunContext
from amiforge.recipe import AwsProvider as AwsSpec
from amiforge.recipe import Checks, OwnersSource, Recipe, SsmSource, parse_recipe
from amiforge.settings import Settings
from amiforge.signing.kms import KmsSigner, KmsVerifier
from amiforge.store.sql import open_store
from amiforge.waiting import Wait

SRC = Path(amiforge.__file__).resolve().parent
# A consumer account publish writes into through its role (moto's STS acts as any account).
CONSUMER = "222233334444"
CONSUMER_ROLE = f"arn:aws:iam::{CONSUMER}:role/amiforge-publish"
# amiforge's own call forms (the reader finds the wrappers of them); waiting.py's loops are looked through whole.
_CALL_FORMS = frozenset(("amiforge/awsapi/clients.py", name) for name in ("call", "paginate", "eventually"))
_LOOPS = "amiforge/waiting.py"
# What the sync test passes through the before-parameter-build event to the before-call one: the call's parameters
# as amiforge gave them (before-call sees them serialised).
_PARAMS = "amiforge_iam_params"


@dataclass(frozen=True)
class ObservedCall:
    action: str
    site: str  # amiforge/…:line of the call site, as aws_call_sites.CallSite.site names it
    refused: tuple[str, ...] = ()  # why IAM would refuse it on AWS under the operation's policy (when armed)


@functools.cache
def call_forms() -> frozenset[tuple[str, str]]:
    """(path, function) of every frame that passes an operation on rather than being the call site."""
    return _CALL_FORMS | frozenset(find_call_sites(SRC).call_forms)


def site_of(frame: FrameType | None) -> str | None:
    """The call site of the AWS call being made from `frame`: the innermost amiforge frame that is not a call form
    (for a `paginate` being consumed, where it was called). None: no amiforge code made it (a test's own call)."""
    forms = call_forms()
    while frame is not None:
        if frame.f_code is _PAGES_CODE:
            return str(frame.f_locals["site"])
        path = Path(frame.f_code.co_filename)
        if path.is_relative_to(SRC):
            relative = path.relative_to(SRC.parent).as_posix()
            if relative != _LOOPS and (relative, frame.f_code.co_name) not in forms:
                return f"{relative}:{frame.f_lineno}"
        frame = frame.f_back
    return None


def _pages(items: Iterator[Any], site: str | None) -> Iterator[Any]:
    yield from items  # `site` is read from this frame by site_of


_PAGES_CODE = _pages.__code__


def trace_paginate(patch: pytest.MonkeyPatch) -> None:
    """Every amiforge module's `paginate` (imported by name) remembers the line that called it."""
    original = clients.paginate

    def traced(*args: Any, **kwargs: Any) -> Iterator[Any]:
        return _pages(original(*args, **kwargs), site_of(sys._getframe(1)))

    for name, module in list(sys.modules.items()):
        if name.startswith("amiforge.") and getattr(module, "paginate", None) is original:
            patch.setattr(module, "paginate", traced)


class CallRecorder:
    """Every API call amiforge makes through a boto3 session, with its IAM action and call site; once `arm`ed with a
    policy, also why IAM would refuse it."""

    def __init__(self) -> None:
        self.calls: list[ObservedCall] = []
        self.policy: Mapping[str, Any] | None = None
        self._lock = threading.Lock()

    def install(self, events: Any) -> None:
        events.register_first("before-parameter-build", self._parameters)
        # First: emulations that answer in before-call (DeregistrationProtection) stop the handlers after them.
        events.register_first("before-call", self._before_call)

    def arm(self, policy: Mapping[str, Any]) -> None:
        self.policy = policy

    def _parameters(self, params: Mapping[str, Any], context: dict[str, Any], **_: Any) -> None:
        context[_PARAMS] = dict(params)

    def _before_call(self, model: Any, request_signer: Any, context: Mapping[str, Any], **_: Any) -> None:
        site = site_of(inspect.currentframe())
        if site is None:
            return
        action = action_of(model.service_model.service_name, model.name)
        refused: tuple[str, ...] = ()
        if self.policy is not None:
            where = Where(str(context.get("client_region")), _account_of(request_signer))
            asked = authorisations(action, context.get(_PARAMS, {}), where)
            refused = tuple(f"{r}: {why}" for r in asked if (why := refusal(self.policy, r)) is not None)
        with self._lock:
            self.calls.append(ObservedCall(action, site, refused))

    def reset(self) -> None:
        with self._lock:
            self.calls.clear()


def _account_of(request_signer: Any) -> str:
    """The account moto acts as for this client: the one its access key belongs to (an assumed role's too)."""
    credentials = getattr(request_signer, "_credentials", None)
    access_key = getattr(credentials, "access_key", None)
    return get_account_id_from(access_key) if access_key else ACCOUNT


# --- what IAM authorises for a call ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Where:
    region: str
    account: str

    def ec2_arn(self, kind: str, resource_id: str) -> str:
        # Images and snapshots have no account in their ARN (EC2's resource types table).
        account = "" if kind in ("image", "snapshot") else self.account
        return f"arn:aws:ec2:{self.region}:{account}:{kind}/{resource_id}"


# EC2 ids by prefix → resource type.
_EC2_KINDS = {"i-": "instance", "ami-": "image", "snap-": "snapshot", "vol-": "volume", "key-": "key-pair"}
# EC2 actions on one resource named by one parameter: action → (parameter, resource type).
_EC2_TARGETS = {
    "ec2:DeregisterImage": ("ImageId", "image"),
    "ec2:ModifyImageAttribute": ("ImageId", "image"),
    "ec2:EnableImageDeregistrationProtection": ("ImageId", "image"),
    "ec2:DisableImageDeregistrationProtection": ("ImageId", "image"),
    "ec2:EnableImageDeprecation": ("ImageId", "image"),
    "ec2:DeleteSnapshot": ("SnapshotId", "snapshot"),
    "ec2:ModifySnapshotAttribute": ("SnapshotId", "snapshot"),
    "ec2:DeleteVolume": ("VolumeId", "volume"),
}
# The permissions EC2 (or the EBS direct APIs) uses a customer managed key with on the caller's behalf ("Requirements
# for Amazon EBS encryption", permissions for users; kms:ReEncrypt* is ReEncryptFrom and ReEncryptTo).
_EBS_KEY_USE = (
    "kms:CreateGrant",
    "kms:Decrypt",
    "kms:DescribeKey",
    "kms:GenerateDataKeyWithoutPlaintext",
    "kms:ReEncryptFrom",
    "kms:ReEncryptTo",
)


def _tags_context(tags: Mapping[str, str], *prefixes: str) -> dict[str, ContextValue]:
    return {f"{prefix}/{key}": value for prefix in prefixes for key, value in tags.items()}


def _request_tags(tags: Iterable[Mapping[str, str]]) -> dict[str, ContextValue]:
    given = {str(t["Key"]): str(t.get("Value", "")) for t in tags}
    return {**_tags_context(given, "aws:RequestTag"), "aws:TagKeys": sorted(given)}


def _ec2_tags(where: Where, resource_id: str) -> dict[str, str]:
    return dict(ec2_backends[where.account][where.region].tags.get(resource_id, {}))


def _existing(where: Where, action: str, kind: str, resource_id: str) -> Request:
    """`action` on the EC2 resource `resource_id`, with its tags as they are now."""
    tags = _ec2_tags(where, resource_id)
    return Request(action, where.ec2_arn(kind, resource_id), _tags_context(tags, "aws:ResourceTag"), resource_id)


def _key_pair(where: Where, params: Mapping[str, Any]) -> Request:
    """DeleteKeyPair, by KeyPairId or KeyName: authorised against the key pair, which may not exist (no tags then)."""
    pairs = ec2_backends[where.account][where.region].key_pairs.values()
    wanted = params.get("KeyPairId") or params.get("KeyName")
    found = [p for p in pairs if wanted in (p.id, p.key_name)]
    if not found:
        return Request(
            "ec2:DeleteKeyPair", where.ec2_arn("key-pair", str(wanted)), {}, f"{wanted}, which does not exist"
        )
    tags = _ec2_tags(where, found[0].id)
    name = str(found[0].key_name)
    return Request("ec2:DeleteKeyPair", where.ec2_arn("key-pair", name), _tags_context(tags, "aws:ResourceTag"), name)


def _group(where: Where, action: str, params: Mapping[str, Any]) -> Request:
    """An Auto Scaling write, authorised against the group (TerminateInstanceInAutoScalingGroup: the instance's)."""
    name = params.get("AutoScalingGroupName")
    if name is None:
        name = _ec2_tags(where, str(params.get("InstanceId"))).get("aws:autoscaling:groupName")
    group = autoscaling_backends[where.account][where.region].autoscaling_groups.get(str(name))
    if group is None:
        return Request(action, f"arn:aws:autoscaling:{where.region}:{where.account}:autoScalingGroup:*", {}, str(name))
    tags = {str(t["Key"]): str(t.get("Value", "")) for t in group.tags}
    return Request(action, group.arn, _tags_context(tags, "aws:ResourceTag", "autoscaling:ResourceTag"), group.name)


def _parameter_arn(where: Where, name: str) -> str:
    return f"arn:aws:ssm:{where.region}:{where.account}:parameter{name if name.startswith('/') else '/' + name}"


def _kms_key(where: Where, key_id: str) -> str:
    if key_id.startswith("arn:") and ":key/" in key_id:
        return key_id
    try:
        return str(kms_backends[where.account][where.region].describe_key(key_id).arn)
    except Exception:  # an alias or id moto does not know: the request names it as given
        return key_id


def _direct(action: str, params: Mapping[str, Any], where: Where) -> list[Request]:
    """The call's own authorisation: the action on each resource it names."""
    if action in _EC2_TARGETS:
        parameter, kind = _EC2_TARGETS[action]
        return [_existing(where, action, kind, str(params[parameter]))]
    if action in ("ec2:TerminateInstances", "ec2:StopInstances"):
        return [_existing(where, action, "instance", str(i)) for i in params["InstanceIds"]]
    if action == "ec2:DeleteKeyPair":
        return [_key_pair(where, params)]
    if action == "ec2:CreateTags":
        asked = _request_tags(params.get("Tags", []))
        requests = []
        for resource in params["Resources"]:
            kind = next((k for prefix, k in _EC2_KINDS.items() if str(resource).startswith(prefix)), "unknown")
            existing = _existing(where, action, kind, str(resource))
            requests.append(Request(action, existing.resource, {**existing.context, **asked}, existing.what))
        return requests
    if action in ROLLOUT_GROUP_WRITES:
        return [_group(where, action, params)]
    if action == "ssm:SendCommand":
        document = str(params["DocumentName"])
        owner = "" if document.startswith("AWS-") else where.account  # AWS's documents have no account in the ARN
        requests = [Request(action, f"arn:aws:ssm:{where.region}:{owner}:document/{document}", {}, "the document")]
        for instance in params.get("InstanceIds", []):
            tags = _ec2_tags(where, str(instance))
            context = _tags_context(tags, "ssm:resourceTag", "aws:ResourceTag")
            requests.append(Request(action, where.ec2_arn("instance", str(instance)), context, str(instance)))
        return requests
    if action == "ssm:PutParameter" or (
        action == "ssm:AddTagsToResource" and params.get("ResourceType") == "Parameter"
    ):
        name = str(params.get("Name") or params.get("ResourceId"))
        return [Request(action, _parameter_arn(where, name), {}, name)]
    if action.startswith("kms:") and "KeyId" in params:
        return [Request(action, _kms_key(where, str(params["KeyId"])), {}, str(params["KeyId"]))]
    return [Request(action, "*", {}, "no resource this check tells apart")]


def _passed_roles(where: Where, profile: Mapping[str, str]) -> list[str]:
    profiles = iam_backends[where.account]["aws"].instance_profiles.values()
    wanted = profile.get("Arn") or profile.get("Name")
    return [role.arn for p in profiles if wanted in (p.arn, p.name) for role in p.roles]


def _on_behalf(action: str, params: Mapping[str, Any], where: Where) -> list[Request]:
    """What IAM also authorises, against the caller, when the call makes AWS act for it."""
    requests: list[Request] = []
    operation = action.split(":", 1)[1]
    if operation in TAG_ON_CREATE and action.startswith("ec2:"):
        for spec in params.get("TagSpecifications", []):
            kind = str(spec["ResourceType"])
            context = {"ec2:CreateAction": operation, **_request_tags(spec.get("Tags", []))}
            requests.append(Request("ec2:CreateTags", where.ec2_arn(kind, "*"), context, f"tags on the new {kind}"))
    if action == "ec2:RunInstances" and params.get("IamInstanceProfile"):
        for role in _passed_roles(where, params["IamInstanceProfile"]) or ["(a role of no known profile)"]:
            passed = {"iam:PassedToService": "ec2.amazonaws.com"}
            requests.append(Request("iam:PassRole", role, passed, "the instance profile's role"))
    if action in ("ec2:RunInstances", "ec2:CopyImage"):
        key = str(params.get("KmsKeyId") or f"arn:aws:kms:{where.region}:{where.account}:key/ebs-default")
        requests += _key_use(_EBS_KEY_USE, key, f"ec2.{where.region}.amazonaws.com", "EC2 encrypting volumes")
    if action in _POINTS_AT_TEMPLATE:
        requests += _launching(where, action, params)
    if action == "ebs:GetSnapshotBlock":
        # ASSUMPTION (as iam._KEY_USERS's): KMS sees the EBS direct APIs as ebs.<region>; the policy also allows
        # ec2.<region> (test_iam checks both), so this request proves the call is covered, not which name AWS uses.
        key = f"arn:aws:kms:{where.region}:{where.account}:key/ebs-default"
        requests += _key_use(("kms:Decrypt",), key, f"ebs.{where.region}.amazonaws.com", "EBS decrypting the block")
    return requests


# Auto Scaling writes that point a group at a launch template version: Auto Scaling checks that the caller may launch
# from it (ec2:RunInstances) and pass its instance profile's role (iam:PassRole) — "Launch template support", Amazon
# EC2 Auto Scaling User Guide (iam.AUTHORISED_ONLY["rollout"]).
_POINTS_AT_TEMPLATE = {
    "autoscaling:UpdateAutoScalingGroup": ("LaunchTemplate",),
    "autoscaling:StartInstanceRefresh": ("DesiredConfiguration", "LaunchTemplate"),
}


def _launching(where: Where, action: str, params: Mapping[str, Any]) -> list[Request]:
    """RunInstances on the template, its image and the instances, and PassRole for its instance profile's role, as
    checked against the caller when `action` points a group at a template version (none when it names none)."""
    spec: Any = params
    for key in _POINTS_AT_TEMPLATE[action]:
        spec = spec.get(key) if isinstance(spec, Mapping) else None
    if not isinstance(spec, Mapping):
        return []
    backend = ec2_backends[where.account][where.region]
    by_name = backend.launch_template_name_to_ids.get(str(spec.get("LaunchTemplateName")))
    template_id = spec.get("LaunchTemplateId") or by_name
    template = backend.launch_templates.get(str(template_id))
    if template is None:
        return [Request("ec2:RunInstances", where.ec2_arn("launch-template", str(template_id)), {}, "the template")]
    data = template.get_version(spec.get("Version") or "$Default").data
    what = f"launching from {template.id} for the group"
    launch = [where.ec2_arn("launch-template", template.id), where.ec2_arn("instance", "*")]
    if data.get("ImageId"):
        launch.append(where.ec2_arn("image", str(data["ImageId"])))
    requests = [Request("ec2:RunInstances", resource, {}, what) for resource in launch]
    if data.get("IamInstanceProfile"):
        passed = {"iam:PassedToService": "ec2.amazonaws.com"}
        for role in _passed_roles(where, data["IamInstanceProfile"]) or ["(a role of no known profile)"]:
            requests.append(Request("iam:PassRole", role, passed, f"the role of {template.id}'s instance profile"))
    return requests


def _key_use(actions: Sequence[str], key: str, via: str, what: str) -> list[Request]:
    requests = []
    for action in actions:
        context: dict[str, ContextValue] = {"kms:ViaService": via}
        if action == "kms:CreateGrant":
            context["kms:GrantIsForAWSResource"] = True  # the grant is for the volume EC2 encrypts
        requests.append(Request(action, key, context, what))
    return requests


def authorisations(action: str, params: Mapping[str, Any], where: Where) -> list[Request]:
    """Everything IAM authorises against the caller for one call of `action` with `params`, in moto's state now."""
    return [*_direct(action, params, where), *_on_behalf(action, params, where)]


# --- the harness ----------------------------------------------------------------------------------------------------


@dataclass
class Harness:
    """One runner's world: moto, an AwsSession counting and recording calls, a scratch folder, a monkeypatch, and the
    policy the operation is held to (`policy_args` for iam.policy_document: signing keys, roles passed)."""

    aws: Aws
    recorder: CallRecorder
    work: Path
    patch: pytest.MonkeyPatch
    operation: str | None = None
    policy_args: dict[str, Any] = field(default_factory=dict)
    clock: Clock = field(default_factory=Clock)

    @property
    def boto(self) -> boto3.Session:
        return self.aws.session.boto_session

    def begin(self) -> None:
        """The operation starts here: what the runner called to set things up is not the operation's. From here on
        each call is held to the operation's policy."""
        self.recorder.reset()
        self.aws.calls.reset()
        if self.operation is not None:
            self.recorder.arm(policy_document([self.operation], **self.policy_args))

    def ec2(self, region: str = REGION) -> Any:
        return self.aws.session.client("ec2", region)

    def wait(self, deadline: float = 7200.0) -> Wait:
        return Wait(first_delay=1.0, max_delay=30.0, deadline=deadline, sleep=self.clock.sleep, clock=self.clock)

    def provider(self, settings: Settings | None = None, **kwargs: Any) -> AwsProvider:
        """The AWS provider as the CLI makes it, on this harness's boto3 session (so every call is recorded)."""
        settings = settings or Settings(data_dir=self.work / "data")
        kwargs.setdefault("publish_wait", self.wait(deadline=180.0))  # never the real clock
        kwargs.setdefault("copy_wait", self.wait(deadline=3 * 3600.0))
        return AwsProvider(settings, boto_session=self.boto, **kwargs)


@contextmanager
def harness(work: Path, operation: str | None = None) -> Iterator[Harness]:
    """A fresh moto and session, as the `aws` fixture makes them (conftest.py), plus the call recorder and the
    emulations every runner needs (snapshot tags at CreateImage, paginate call sites)."""
    with pytest.MonkeyPatch.context() as patch:
        paging = PagingEmulation()
        paging.install(patch)
        fast_tag_lookup(patch)
        SnapshotTagsAtCreation().install(patch)
        trace_paginate(patch)
        with mock_aws():
            boto = boto3.Session(region_name=REGION)
            recorder = CallRecorder()
            recorder.install(boto.events)
            calls = ApiCalls()
            calls.install(boto.events)
            session = AwsSession(REGION, boto_session=boto, run_id="test", max_attempts=10)
            yield Harness(Aws(session, calls, paging), recorder, work, patch, operation)


def observe(operation: str, work: Path) -> list[ObservedCall]:
    """What `operation` calls, run by its runner in a fresh moto, held to its policy."""
    with harness(work, operation) as h:
        RUNNERS[operation](h)
        return list(h.recorder.calls)


# --- the machine bake and boot test talk to ------------------------------------------------------------------------


class ShadowedMachine:
    """A `Machine` whose every command also goes to the instance through the real SsmMachine (moto answers Success with
    no output), while `fake` answers as the guest would: the SSM calls are made as on AWS, the bake sees a guest."""

    def __init__(self, real: SsmMachine, fake: FakeMachine) -> None:
        self.real, self.fake = real, fake

    def run(self, argv: Sequence[str], *, timeout: float) -> CommandResult:
        self.real.run(argv, timeout=timeout)
        return self.fake.run(argv, timeout=timeout)

    def put_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        # The real upload cannot finish on moto (it seals the bytes with the instance's upload key, which moto's empty
        # output never gives): one command stands for its SendCommands, made where every command is made.
        self.real.run(["test", "-d", posixpath.dirname(path) or "/"], timeout=60)
        self.fake.put_file(path, data, mode)

    def read_file(self, path: str) -> bytes:
        # The real read_file cannot finish on moto (its empty output is no file): one command stands for its reads.
        self.real.run(["stat", "-c", "%s", path], timeout=60)
        return self.fake.read_file(path)

    def console(self) -> str:
        self.real.console()
        return self.fake.console()

    def leftovers(self) -> Leftovers:
        return self.real.leftovers()  # what the bake's generalisation removes is SSM's, as on AWS


class SerialConsole:
    """GetConsoleOutput answered as EC2 does, base64 text (moto's is fixed text): cloud-init's host key block and the
    readiness line — after a first answer without Output, as EC2 gives before it has captured anything. On the
    generic before-call event, after the CallRecorder, so the call is still recorded. Latest=true for an instance of
    a Xen type is left to `XenConsole`, which refuses it as EC2 does."""

    def __init__(self) -> None:
        keys = [" ".join(new_key_pair("root@builder")[1].split()[:2]) for _ in range(2)]
        self.text = "\n".join(["cloud-init", HOST_KEYS_BEGIN, *keys, HOST_KEYS_END, READY])
        self.answered: set[str] = set()  # instances whose console was read once

    def install(self, events: Any) -> None:
        events.register("before-call", self._answer)
        XenConsole(ACCOUNT, REGION).install(events)

    def _answer(self, model: Any, params: dict[str, Any], **_: Any) -> tuple[AWSResponse, dict[str, Any]] | None:
        if model.name != "GetConsoleOutput":
            return None
        if str(params["body"].get("Latest", "")).lower() == "true" and _xen(params["body"]["InstanceId"]):
            return None
        instance = str(params["body"]["InstanceId"])
        answer: dict[str, Any] = {"InstanceId": instance, "ResponseMetadata": {}}
        if instance in self.answered:
            answer["Output"] = base64.b64encode(self.text.encode()).decode()
        self.answered.add(instance)
        return AWSResponse(str(params.get("url", "")), 200, {}, None), answer


class FirstSendLost:
    """The first SendCommand never reaches SSM and its answer is an HTTP 500, as after a connection lost on the way
    back: SsmMachine cannot tell whether SSM took it, looks for it (ListCommands), and sends it again."""

    def __init__(self) -> None:
        self.lost = 0

    def install(self, events: Any) -> None:
        events.register_first("before-send.ssm.SendCommand", self._send)

    def _send(self, request: Any, **_: Any) -> AWSResponse | None:
        if self.lost:
            return None
        self.lost += 1
        response = error_response(request.url, "ssm", "InternalServerError", 500)
        request.url = _NOWHERE  # no moto backend matches it: SSM never sees the request
        return response


_NOWHERE = "https://amiforge-lost-answer.invalid/"


def _xen(instance_id: str) -> bool:
    instance = ec2_backends[ACCOUNT][REGION].get_instance(instance_id)
    return bool(INSTANCE_TYPES[instance.instance_type].get("Hypervisor") == "xen")


def ssh_to(fake: FakeMachine) -> SshConnect:
    """Stands in for SshMachine's connection (no sshd answers here); everything before it is the real SSH wiring."""

    def connect(host: str, *, username: str, private_key: str, host_keys: Sequence[str], console: Any) -> Machine:
        assert host and private_key and host_keys  # the instance's address, the imported key, the pinned host keys
        return fake

    return connect


def shadowed(h: Harness, fake: FakeMachine) -> MachineFactory:
    def make(session: AwsSession, region: str, instance_id: str) -> Machine:
        fake.instance_id = instance_id
        real = SsmMachine(session, region, instance_id, sleep=h.clock.sleep, clock=h.clock)
        return ShadowedMachine(real, fake)

    return make


# --- worlds -------------------------------------------------------------------------------------------------------

RECIPE = """\
name: web
provider:
  type: aws
  region: {region}
  source: {source}
  distribution:
    regions: [{{region: us-east-1, kms_key: {key}}}, {{region: ap-southeast-2}}]
    accounts: ["{consumer}"]
    organizations: ["arn:aws:organizations::999988887777:organization/o-abcdefghij"]
  publish: {{launch_template: web-fleet, accounts: ["{consumer}"]}}
steps:
  - packages: [nginx]
  - file: {{src: index.html, dest: /var/www/html/index.html}}
  - shell: echo hi > /etc/motd
  - user: {{name: deploy}}
checks:
  units: [nginx]
  commands: [{{run: "nginx -t"}}]
"""
OWNERS_SOURCE = f'{{owners: ["{ACCOUNT}"], name: debian-12-*}}'
SSM_SOURCE = "{ssm_parameter: /src/debian}"


def recipe(
    h: Harness,
    source: str = OWNERS_SOURCE,
    key: str = "alias/aws/ebs",
    *,
    ssh: bool = False,
    boot_test_type: str | None = None,
) -> Recipe:
    folder = h.work / "recipe"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "index.html").write_text("web tier\n")
    text = RECIPE.format(region=REGION, source=source, key=key, consumer=CONSUMER)
    if ssh:  # the SSH communicator, and a group that lets port 22 in (amiforge makes none)
        group = h.ec2().create_security_group(GroupName=f"ssh-{uuid.uuid4().hex[:8]}", Description="ssh")["GroupId"]
        text = text.replace("  source:", f"  communicator: ssh\n  security_group_ids: [{group}]\n  source:", 1)
    else:  # SSM: the instance profile that lets the agent reach SSM, whose role RunInstances passes
        text = text.replace("  source:", f"  instance_profile: {INSTANCE_PROFILE}\n  source:", 1)
    if boot_test_type is not None:
        text = text.replace("  source:", f"  boot_test_instance_type: {boot_test_type}\n  source:", 1)
    return parse_recipe(text, folder / "recipe.yaml")


INSTANCE_PROFILE = "amiforge-builder"


def instance_profile(h: Harness) -> str:
    """The SSM recipes' instance profile and its role (the role's ARN: what iam:PassRole may pass)."""
    iam: Any = h.aws.session.client("iam")
    trust = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"},
                                                      "Action": "sts:AssumeRole"}]}  # fmt: skip
    role = iam.create_role(RoleName="amiforge-builder-ssm", AssumeRolePolicyDocument=json.dumps(trust))["Role"]
    iam.create_instance_profile(InstanceProfileName=INSTANCE_PROFILE)
    iam.add_role_to_instance_profile(InstanceProfileName=INSTANCE_PROFILE, RoleName=role["RoleName"])
    return str(role["Arn"])


def image(h: Harness, name: str, region: str = REGION, *, managed: bool = True) -> str:
    """An available image of this account, it and its snapshots tagged as amiforge's (as a bake tags them), or
    untagged (`managed=False`: made elsewhere, Packer's)."""
    ec2 = h.ec2(region)
    instance = ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
    tags = [{"Key": MANAGED_TAG, "Value": "true"}]
    specs = [{"ResourceType": kind, "Tags": tags} for kind in ("image", "snapshot")] if managed else []
    return str(ec2.create_image(InstanceId=instance, Name=name, TagSpecifications=specs)["ImageId"])


def artifact(h: Harness, image_id: str, region: str = REGION) -> Artifact:
    return artifact_of(describe_image(h.aws.session, region, image_id), region)


def context(stack: Cleanups, run_id: str) -> RunContext:
    return RunContext(run_id=run_id, cleanup=stack, log=lambda _line: None)


def images(h: Harness) -> dict[str, str]:
    """Two managed images, a launch template on the first, an SSM parameter naming it."""
    ids = {name: image(h, f"web-{name}") for name in ("a", "b")}
    h.ec2().create_launch_template(LaunchTemplateName="web-fleet", LaunchTemplateData={"ImageId": ids["a"]})
    h.aws.session.client("ssm").put_parameter(Name="/src/debian", Value=ids["a"], Type="String", Overwrite=True)
    return ids


# --- the runners ----------------------------------------------------------------------------------------------------


def _resolve(h: Harness) -> None:
    images(h)
    h.begin()
    resolve_source(OwnersSource(owners=[ACCOUNT], name="web-*"), h.aws.session, REGION)
    resolve_source(SsmSource(ssm_parameter="/src/debian"), h.aws.session, REGION)
    # Only an image the recipe's instance type can run (its architectures, from DescribeInstanceTypes).
    resolve_source(SsmSource(ssm_parameter="/src/debian"), h.aws.session, REGION, instance_type="t3.micro")


def _inventory(h: Harness) -> None:
    images(h)
    h.begin()
    assert len(inventory(h.aws.session, REGION)) == 2


def _bake(h: Harness) -> None:
    """A bake that succeeds; one whose step fails; one whose image never becomes available."""
    source = image(h, "debian-12-20240501")
    h.aws.session.client("ssm").put_parameter(Name="/src/debian", Value=source, Type="String")
    SerialConsole().install(h.boto.events)
    FirstSendLost().install(h.boto.events)
    h.policy_args["pass_roles"] = [instance_profile(h)]
    ssh_recipe = recipe(h, ssh=True)
    earlier_attempts_key(h, "bake-ssh", "builder")
    h.begin()

    def respond(script: str) -> CommandResult:
        return CommandResult(
            0, "AMIFORGE-GENERALISED netrc\t/root/.netrc\n" if "AMIFORGE_HOSTNAME=" in script else "", ""
        )

    fine = h.provider(machine_factory=shadowed(h, FakeMachine(respond)), wait=h.wait())
    with Cleanups() as stack:
        fine.bake(recipe(h), context(stack, "bake-ok"))
    assert stack.leftovers == []

    # The SSH communicator: a throw-away key pair imported for the run (replacing the one an earlier attempt of the run
    # left) and deleted after it, host keys from the console.
    ssh = h.provider(ssh_connect=ssh_to(FakeMachine(respond)), wait=h.wait())
    with Cleanups() as stack:
        ssh.bake(ssh_recipe, context(stack, "bake-ssh"))
    assert stack.leftovers == []

    failing = FakeMachine(lambda s: CommandResult(3, "", "E: boom") if "useradd" in s else CommandResult(0, "", ""))
    provider = h.provider(machine_factory=shadowed(h, failing), wait=h.wait())
    with pytest.raises(InfraError, match="step 4"), Cleanups() as stack:
        provider.bake(recipe(h, SSM_SOURCE), context(stack, "bake-step-fails"))
    assert stack.leftovers == []

    existing = {i["ImageId"] for i in h.ec2().describe_images(Owners=["self"])["Images"]}
    with pytest.MonkeyPatch.context() as patch:
        never_available(patch, existing)
        stuck = h.provider(machine_factory=shadowed(h, FakeMachine(respond)), wait=h.wait(deadline=600.0))
        with pytest.raises(InfraError, match="not done after"), Cleanups() as stack:
            stuck.bake(recipe(h), context(stack, "bake-never-available"))
    assert stack.leftovers == []
    assert {i["ImageId"] for i in h.ec2().describe_images(Owners=["self"])["Images"]} == existing


def earlier_attempts_key(h: Harness, run_id: str, role: str) -> None:
    """The throw-away key pair an earlier attempt of run `run_id` imported, tagged as amiforge tags it: the run's own
    import then meets InvalidKeyPair.Duplicate and replaces it (instances.throwaway_key)."""
    name = f"amiforge-{run_id}-{role}"
    tags = [{"Key": MANAGED_TAG, "Value": "true"}, {"Key": RUN_TAG, "Value": run_id}]
    h.ec2().import_key_pair(
        KeyName=name,
        PublicKeyMaterial=new_key_pair(name)[1].encode(),
        TagSpecifications=[{"ResourceType": "key-pair", "Tags": tags}],
    )


def never_available(patch: pytest.MonkeyPatch, existing: set[str]) -> None:
    """Every image but `existing` stays `pending` (an image whose snapshot never completes), as test_bake.py does."""
    from moto.ec2.models.amis import Ami

    def state(ami: Any) -> str:
        return str(ami.__dict__.get("state", "available")) if ami.id in existing else "pending"

    def set_state(ami: Any, value: str) -> None:
        ami.__dict__["state"] = value

    patch.setattr(Ami, "state", property(state, set_state), raising=False)


def _boot_test(h: Harness) -> None:
    """The boot test with each communicator: the readiness line on the console, then the checks on the instance; and
    on a Xen instance type, whose console EC2 gives only as its buffered copy."""
    tested = artifact(h, image(h, "web-1"))
    SerialConsole().install(h.boto.events)
    FirstSendLost().install(h.boto.events)
    h.policy_args["pass_roles"] = [instance_profile(h)]
    ssm, ssh, xen = recipe(h), recipe(h, ssh=True), recipe(h, boot_test_type="t2.micro")
    h.begin()
    provider = h.provider(machine_factory=shadowed(h, FakeMachine()), boot_wait=h.wait(deadline=900.0))
    for spec, run_id in ((ssm, "boot-ssm"), (xen, "boot-xen")):
        with Cleanups() as stack:
            report = provider.boot_test(tested, spec.checks, context(stack, run_id), spec.provider)
        assert report.passed, report.checks
    provider = h.provider(ssh_connect=ssh_to(FakeMachine()), boot_wait=h.wait(deadline=900.0))
    with Cleanups() as stack:
        report = provider.boot_test(tested, ssh.checks, context(stack, "boot-ssh"), ssh.provider)
    assert report.passed, report.checks


def _scan(h: Harness) -> None:
    """An AMI's root snapshot read through the EBS direct APIs and mounted, as `amiforge scan` does."""
    ebs = EbsEmulation()
    ebs.install(h.patch)
    tree = h.work / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/hostname").write_text("scan\n")
    raw = h.work / "root.raw"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(raw), "8M"], check=True)
    scanned = artifact(h, ebs.register_ami(h.ec2(), "scan-me", raw))
    h.begin()
    with h.provider().inspect(scanned) as view:
        assert (view.root / "etc/hostname").read_text() == "scan\n"


def _import(h: Harness) -> None:
    """An image Packer baked (untagged, its snapshot too) adopted: amiforge manages it from now on."""
    packer = image(h, "packer-web-1", managed=False)
    h.begin()
    h.provider().adopt(REGION, packer)


def _signing_key(h: Harness) -> str:
    kms: Any = h.aws.session.client("kms")
    return str(kms.create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")["KeyMetadata"]["Arn"])


def _signed_artifacts(h: Harness) -> Callable[[], None]:
    """What `amiforge sign` and `verify` ask of a version's AWS artifacts before they sign or verify: that each still
    has the digest the registry recorded (lifecycle.sign.check_artifact_bytes, through the provider it names)."""
    signed = artifact(h, image(h, "web-1"))
    settings = Settings(data_dir=h.work / "data")
    h.patch.setattr(amiforge.providers, "PROVIDERS", {**amiforge.providers.PROVIDERS, "aws": h.provider})
    now = datetime.now(UTC)
    version = ImageVersion(1, "web", 1, Status.SCANNED, "0" * 64, "recipe.yaml", "aws", now, now, digest="0" * 64)
    return lambda: check_artifact_bytes(version, [signed], settings)


def _sign(h: Harness) -> None:
    """`amiforge keys trust --kms-key` and `amiforge sign --kms-key`: the artifacts' digests, the key resolved, its
    public key, a signature."""
    key = _signing_key(h)
    check_artifacts = _signed_artifacts(h)
    h.policy_args["kms_keys"] = [key]
    h.begin()
    check_artifacts()
    signer = KmsSigner(key, REGION, session=h.aws.session)
    assert signer.key_id == f"kms:{key}"
    signer.public_key_pem()
    signer.sign(b"manifest")


def _verify(h: Harness) -> None:
    """`amiforge verify` with a KMS key the registry lacks the public key of, and the artifacts' digests."""
    key = _signing_key(h)
    check_artifacts = _signed_artifacts(h)
    h.policy_args["kms_keys"] = [key]
    h.begin()
    KmsVerifier(REGION, session=h.aws.session).public_key_pem("kms:" + key)
    check_artifacts()


def distribution(h: Harness) -> AwsSpec:
    """The recipe's aws section, its us-east-1 copy under a customer managed key whose policy lets the receivers (the
    consumer account, the organization) use it, as distribute's preflight requires; with the emulations a
    distribution needs (CopyImage as AWS answers it, deregistration protection)."""
    CopyImageEmulation().install(h.patch)
    DeregistrationProtection().install(h.boto.events)
    owner = {
        "Effect": "Allow",
        "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:root"},
        "Action": "kms:*",
        "Resource": "*",
    }
    use = {"Effect": "Allow", "Action": list(SHARE_ACTIONS), "Resource": "*"}
    statements = [
        owner,
        {**use, "Principal": {"AWS": f"arn:aws:iam::{CONSUMER}:root"}},
        {**use, "Principal": "*", "Condition": {"StringEquals": {"aws:PrincipalOrgID": "o-abcdefghij"}}},
    ]
    policy = json.dumps({"Version": "2012-10-17", "Statement": statements})
    kms: Any = h.aws.session.client("kms", "us-east-1")
    key = kms.create_key(Description="ebs us-east-1", Policy=policy)["KeyMetadata"]["Arn"]
    spec = recipe(h, key=key).provider
    assert isinstance(spec, AwsSpec)
    return spec


def _distribute(h: Harness) -> None:
    """Copies to two regions (one under a customer managed key, one keeping the source's encryption), shared with an
    account and an organization: preflight, copy, wait, tag, share, protect."""
    spec = distribution(h)
    source = artifact(h, image(h, "web-20240501"))
    h.begin()
    copies = h.provider().distribute(
        source, spec, run_id="dist-1", public=False, on_copy=lambda _c: None, progress=lambda _p: None
    )
    assert sorted(c.artifact.region for c in copies) == ["ap-southeast-2", "us-east-1"]


def _publish(h: Harness) -> None:
    """A channel published in this account and, through its role, in a consumer account: the parameter created,
    overwritten, then left as it is; the launch template's default moved."""
    shared_images(h.patch)  # the consumer account sees the image shared with it, as on AWS
    ids = images(h)
    settings = Settings(data_dir=h.work / "data", aws_roles={CONSUMER: CONSUMER_ROLE})
    setup = AwsSession(REGION, role_arns=settings.aws_roles, boto_session=h.boto)  # not the provider's: its role
    consumer = setup.as_account(CONSUMER).client("ec2")  # is assumed by the publication itself, as on AWS
    consumer.create_launch_template(LaunchTemplateName="web-fleet", LaunchTemplateData={"ImageId": ids["a"]})
    provider = h.provider(settings)
    for image_id in ids.values():
        h.ec2().modify_image_attribute(ImageId=image_id, LaunchPermission={"Add": [{"UserId": CONSUMER}]})
    spec = recipe(h).provider
    h.begin()
    for image_id in (ids["a"], ids["b"], ids["b"]):  # new parameter and tags; overwrite and new LT version; no-op
        provider.publish([artifact(h, image_id)], spec, name="web", channel="prod", run_id="r")


def _alarm(h: Harness, name: str, state: str) -> None:
    cloudwatch: Any = h.aws.session.client("cloudwatch")
    cloudwatch.put_metric_alarm(
        AlarmName=name, MetricName="HTTPCode_Target_5XX_Count", Namespace="AWS/ApplicationELB", Statistic="Sum",
        Period=60, EvaluationPeriods=1, Threshold=1.0, ComparisonOperator="GreaterThanOrEqualToThreshold",
    )  # fmt: skip
    cloudwatch.set_alarm_state(AlarmName=name, StateValue=state, StateReason="test")


def _heartbeat(h: Harness, instance_id: str, at: datetime) -> None:
    """What the instance's reporter sends (guest_files/cloudwatch): with the instance's role, not the operation's."""
    cloudwatch: Any = h.boto.client("cloudwatch", region_name=REGION)
    cloudwatch.put_metric_data(Namespace="amiforge", MetricData=[{
        "MetricName": "Heartbeat", "Value": 1.0, "Unit": "Count", "Timestamp": at,
        "Dimensions": [{"Name": "InstanceId", "Value": instance_id}]}])  # fmt: skip


def _rollout(h: Harness) -> None:
    """A wave of one on an Auto Scaling group (replace), then current() and signals(); then an instance refresh
    started, looked at and rolled back: what a rollout calls, in either mode."""
    ids = images(h)
    install_asg_emulation(h.patch)  # console readiness, Auto Scaling's asynchronous termination, LT inheritance
    # The groups launch with an instance profile: pointing them at a new version passes its role (on_behalf).
    h.policy_args.setdefault("pass_roles", [instance_profile(h)])
    for group in ("web-asg", "web-refresh"):  # web-refresh: for the instance-refresh mode
        with_instance_profile(h, group, make_group(h.aws.session, group, ids["a"], size=2), ids["a"])
    behind_load_balancers(h, "web-refresh")
    InstanceRefreshEmulation().install(h.patch)
    _alarm(h, "web-5xx", "OK")
    h.begin()
    time = FakeTime()
    fleet = AsgFleet(h.aws.session, REGION, "web-asg", wait=time.wait(), now=time.now)
    member = fleet.current()[0].id
    image_b = Artifact(provider="aws", region=REGION, location=ids["b"], digest="sha256:x", size_bytes=0)
    (new,) = fleet.replace(
        [Replacement(member, "token-1")], image_b, Release("web", "web@2", "ab" * 32, time.now()), Checks()
    )
    assert new.state == "ready"
    assert {m.id for m in fleet.current()} >= {new.id}
    _heartbeat(h, new.id, time.now())
    kinds = {s.kind for s in fleet.signals(datetime(2000, 1, 1, tzinfo=UTC))}
    assert kinds == {"launch", "ready", "replaced", "heartbeat"}
    assert fleet.alarms_firing(["web-5xx"]) == []
    refreshed = AsgFleet(h.aws.session, REGION, "web-refresh", wait=time.wait(), now=time.now)
    refresh_id = start_refresh(
        refreshed, image_b, "web@2", checkpoints=[50, 100], checkpoint_delay=600, alarms=["web-5xx"], token="r-1"
    )
    assert refresh_status(refreshed, refresh_id).status == "InProgress"
    # What a batch may take on AWS's side: warm-up, the lifecycle hook, the load balancers' checks and draining.
    assert {"load balancer health checks", "load balancer draining"} <= set(refreshed.refresh_batch_time())
    assert roll_back_refresh(refreshed, refresh_id).status.startswith("Rollback")


def with_instance_profile(h: Harness, group: str, template_id: str, image_id: str) -> None:
    """`group` launching from a new version of its template that has the recipes' instance profile."""
    data = {"ImageId": image_id, "InstanceType": "t3.micro", "IamInstanceProfile": {"Name": INSTANCE_PROFILE}}
    version = h.ec2().create_launch_template_version(LaunchTemplateId=template_id, LaunchTemplateData=data)
    number = str(version["LaunchTemplateVersion"]["VersionNumber"])
    spec = {"LaunchTemplateId": template_id, "Version": number}
    h.aws.session.client("autoscaling").update_auto_scaling_group(AutoScalingGroupName=group, LaunchTemplate=spec)


def behind_load_balancers(h: Harness, group: str) -> None:
    """`group` behind a target group and a classic load balancer (with connection draining), and a termination
    lifecycle hook: what an instance refresh's batch time is made of (refresh.batch_time)."""
    vpc = h.ec2().describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"][0]["VpcId"]
    elbv2: Any = h.aws.session.client("elbv2")
    target_group = elbv2.create_target_group(Name=f"{group}-tg", Protocol="HTTP", Port=80, VpcId=vpc)
    arn = target_group["TargetGroups"][0]["TargetGroupArn"]
    elb: Any = h.aws.session.client("elb")
    listeners = [{"Protocol": "HTTP", "LoadBalancerPort": 80, "InstancePort": 80}]
    elb.create_load_balancer(LoadBalancerName=f"{group}-clb", Listeners=listeners, AvailabilityZones=[f"{REGION}a"])
    elb.modify_load_balancer_attributes(
        LoadBalancerName=f"{group}-clb",
        LoadBalancerAttributes={"ConnectionDraining": {"Enabled": True, "Timeout": 120}},
    )
    asg: Any = h.aws.session.client("autoscaling")
    asg.attach_load_balancer_target_groups(AutoScalingGroupName=group, TargetGroupARNs=[arn])
    asg.attach_load_balancers(AutoScalingGroupName=group, LoadBalancerNames=[f"{group}-clb"])
    asg.put_lifecycle_hook(
        LifecycleHookName="drain",
        AutoScalingGroupName=group,
        LifecycleTransition="autoscaling:EC2_INSTANCE_TERMINATING",
        HeartbeatTimeout=300,
    )


def _gc(h: Harness) -> None:
    """Leftovers of one of each kind (a key pair too) from a finished run, planned and removed."""
    ids = images(h)
    install_gc_emulation(h.aws.paging, h.patch)  # DescribeVolumes paging, the snapshot-id image filter
    ec2 = h.ec2()
    tags = [{"Key": MANAGED_TAG, "Value": "true"}, {"Key": RUN_TAG, "Value": "gc-run"}]
    spec = [{"ResourceType": "instance", "Tags": tags}]
    instance = ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1, TagSpecifications=spec)
    leftover = ec2.create_image(
        InstanceId=instance["Instances"][0]["InstanceId"],
        Name="gc-leftover",
        TagSpecifications=[{"ResourceType": "image", "Tags": tags}],
    )["ImageId"]
    image_snapshot = ec2.describe_images(ImageIds=[leftover])["Images"][0]["BlockDeviceMappings"][0]["Ebs"]
    ec2.create_tags(Resources=[image_snapshot["SnapshotId"]], Tags=tags)
    volume = ec2.create_volume(Size=1, AvailabilityZone=f"{REGION}a")["VolumeId"]
    ec2.create_snapshot(VolumeId=volume, TagSpecifications=[{"ResourceType": "snapshot", "Tags": tags}])
    ec2.create_volume(
        Size=1, AvailabilityZone=f"{REGION}a", TagSpecifications=[{"ResourceType": "volume", "Tags": tags}]
    )
    ec2.import_key_pair(  # the SSH communicator's throw-away key, as a killed bake leaves it
        KeyName="amiforge-gc-run-builder",
        PublicKeyMaterial=new_key_pair("amiforge-gc-run-builder")[1].encode(),
        TagSpecifications=[{"ResourceType": "key-pair", "Tags": tags}],
    )
    h.begin()
    plan = plan_gc(
        h.aws.session,
        REGION,
        registered_images=set(ids.values()),
        run_state=lambda run: "finished" if run == "gc-run" else "unknown",
        now=datetime(2100, 1, 1, tzinfo=UTC),  # everything is old enough
    )
    assert sorted(o.kind for o in plan.orphans) == ["image", "instance", "key-pair", "snapshot", "snapshot", "volume"]
    assert apply_gc(h.aws.session, plan).ok


def _retire(h: Harness) -> None:
    """A registry of managed images: one an instance uses, one in an SSM parameter, one shared with an account read
    through its role, one nothing uses (protected, as distribute leaves its copies; an Auto Scaling group with a warm
    pool launches another image): retire applied until that one is gone, snapshots included; and one more, of an
    image whose snapshots are kept a week, deregistered into the Recycle Bin and restored from it."""
    ImageLifecycle().install(h.patch, h.boto.events)  # deprecation, protection, the Recycle Bin (moto has none)
    install_gc_emulation(h.aws.paging, h.patch)  # the snapshot-id image filter
    ids = images(h)  # a: in a launch template and a parameter
    free, kept = image(h, "web-free"), image(h, "app-kept")
    h.ec2().enable_image_deregistration_protection(ImageId=free)
    h.ec2().run_instances(ImageId=ids["b"], MinCount=1, MaxCount=1)
    make_group(h.aws.session, "web-asg", ids["a"], size=0)
    h.aws.session.client("autoscaling").put_warm_pool(AutoScalingGroupName="web-asg", MinSize=0)
    h.ec2().create_launch_template(
        LaunchTemplateName="pinned", LaunchTemplateData={"ImageId": "resolve:ssm:/src/debian:1"}
    )
    h.aws.session.client("rbin").create_rule(
        ResourceType="EC2_IMAGE", RetentionPeriod={"RetentionPeriodValue": 7, "RetentionPeriodUnit": "DAYS"}
    )
    settings = Settings(data_dir=h.work / "data", aws_roles={CONSUMER: CONSUMER_ROLE})
    h.ec2().modify_image_attribute(ImageId=ids["b"], LaunchPermission={"Add": [{"UserId": CONSUMER}]})
    store = open_store(f"sqlite:///{h.work}/retire.db")
    for name, image_id in (("web", ids["a"]), ("web", ids["b"]), ("web", free), ("app", kept)):
        v = store.create_version(name=name, recipe_digest="r" * 64, recipe_path="/r.yaml", provider="aws", tags={},
                                 parent=None)  # fmt: skip
        store.add_artifact(v.id, artifact(h, image_id))
        store.transition(v.id, Status.BUILT, expect=Status.BAKING, digest="d" * 64, size_bytes=8)
    provider = h.provider(settings)
    eager = {"keep_last": 0, "keep_younger_than": "0s", "deprecate_after": "0s", "grace": "0s", "snapshot_grace": "0s"}
    rules = Retention.model_validate({"default": eager, "images": {"app": {"snapshot_grace": "7d"}}})
    h.begin()
    for _ in range(3):  # deprecate; lift the protection and deregister; delete the snapshots
        retire.apply(store, rules, lambda _kind: provider, actor="iam", now=datetime.now(UTC))
    assert store.get_version("web@3").status is Status.RETIRED
    retire.restore(store, "app@1", lambda _kind: provider, actor="iam")
    store.close()


def _drift(h: Harness) -> None:
    """Instances on images of the account and of another (Amazon's), with the Allowed AMIs setting enabled."""
    lifecycle = ImageLifecycle()
    lifecycle.install(h.patch, h.boto.events)
    ids = images(h)
    h.ec2().run_instances(ImageId=ids["a"], MinCount=1, MaxCount=1)
    lifecycle.allowed[(ACCOUNT, REGION)] = ("enabled", [{"ImageProviders": ["amazon"]}])
    provider = h.provider()
    h.begin()
    survey = provider.running([REGION])
    assert not survey.failures and len(survey.machines) >= 1


def _report(h: Harness) -> None:
    """What two managed images store (their snapshots), for `report cost` and `report tags`."""
    ids = images(h)
    provider = h.provider()
    h.begin()
    found = provider.stored(REGION, [artifact(h, i) for i in ids.values()])
    assert set(found) == set(ids.values())


def _doctor(h: Harness) -> None:
    """`amiforge doctor --aws --recipe`, for two recipes that between them reach every check (public sharing and
    encrypted shares exclude each other), as test_doctor.py's own exactness test does: one public, from an SSM
    parameter, over SSH; one shared, from an encrypted image of the account, in a subnet of its own."""
    emulation = DoctorEmulation(h.patch)
    copy_region, receiver = "eu-central-1", "111122223333"
    for region in (REGION, copy_region):
        internet_for_default_vpc(h.ec2(region))
    emulation.public_access.state[(ACCOUNT, REGION)] = "unblocked"
    h.ec2(copy_region).enable_ebs_encryption_by_default()
    h.aws.session.client("ssm").put_parameter(Name="/src/debian", Value=image(h, "plain"), Type="String")
    encrypted = image(h, "debian-13-20250101")
    snapshot = ec2_backends[ACCOUNT][REGION].amis[encrypted].ebs_snapshot  # moto shows no Encrypted on the image
    snapshot.encrypted, snapshot.kms_key_id = True, _receivers_key(h, REGION, receiver)
    vpc = h.ec2().describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"][0]["VpcId"]
    subnet = h.ec2().create_subnet(VpcId=vpc, CidrBlock="172.31.200.0/24")["Subnet"]["SubnetId"]
    group = h.ec2().create_security_group(GroupName="ssh", Description="ssh", VpcId=vpc)["GroupId"]
    ssh_in = [{"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]
    h.ec2().authorize_security_group_ingress(GroupId=group, IpPermissions=ssh_in)
    base = {"type": "aws", "region": REGION}
    public = AwsSpec.model_validate(
        {
            **base,
            "source": {"ssm_parameter": "/src/debian"},
            "root_volume": {"encrypted": True},  # under the default key, which cannot be public
            "distribution": {"regions": [{"region": copy_region}], "public": True},
            "communicator": "ssh",
            "security_group_ids": [group],
        }
    )
    shared = AwsSpec.model_validate(
        {
            **base,
            "source": {"owners": [ACCOUNT], "name": "debian-13-*"},
            "subnet_id": subnet,
            "distribution": {
                "regions": [{"region": copy_region, "kms_key": _receivers_key(h, copy_region, receiver)}],
                "accounts": [receiver],
            },
        }
    )
    h.begin()
    provider = h.provider()
    for spec in (public, shared):
        report = provider.account_report(REGION, spec)
        assert report.account == ACCOUNT and REGION in report.regions


def _receivers_key(h: Harness, region: str, receiver: str) -> str:
    """A customer managed key whose policy lets `receiver` use it (the owner's statement and the receivers')."""
    kms = h.aws.session.client("kms", region)
    key = str(kms.create_key(Description="ebs")["KeyMetadata"]["Arn"])
    owner = {
        "Effect": "Allow",
        "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:root"},
        "Action": "kms:*",
        "Resource": "*",
    }
    receivers = {
        "Effect": "Allow",
        "Principal": {"AWS": f"arn:aws:iam::{receiver}:root"},
        "Action": list(SHARE_ACTIONS),
        "Resource": "*",
    }
    policy = json.dumps({"Version": "2012-10-17", "Statement": [owner, receivers]})
    kms.put_key_policy(KeyId=key.rsplit("/", 1)[1], PolicyName="default", Policy=policy)
    return key


# Every declared operation, and how to run it. test_iam.py fails for an operation without a runner.
RUNNERS: dict[str, Callable[[Harness], None]] = {
    "resolve-source": _resolve,
    "inventory": _inventory,
    "bake": _bake,
    "boot-test": _boot_test,
    "scan": _scan,
    "import": _import,
    "sign-kms": _sign,
    "verify-kms": _verify,
    "distribute": _distribute,
    "publish": _publish,
    "rollout": _rollout,
    "gc": _gc,
    "retire": _retire,
    "drift": _drift,
    "report": _report,
    "doctor": _doctor,
}
