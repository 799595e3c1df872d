"""Distribution: copy a baked image to the recipe's regions, each under that region's KMS key, and share it.

`plan_distribution()` checks the inputs (every problem at once), `preflight()` checks the cloud before anything is
created, and `distribute()` converges each region, regions in parallel:

1. **adopt** an existing copy: DescribeImages, owned by the caller, tagged `amiforge:source-image=<src>` and
   `amiforge:run=<run>`; else
2. **copy** with a ClientToken derived from (run, source image, region): a rerun after a crash that lost CopyImage's
   answer gets the same image back from AWS instead of a second one. The tags are set *at creation* through
   TagSpecifications, on the image *and* on its new snapshots (ResourceType `image` and `snapshot`), so there is no
   window in which a copy exists untagged (and so unadoptable). The snapshots need `amiforge:managed=true` too: the
   IAM policy allows ModifySnapshotAttribute (sharing) and DeleteSnapshot (gc, retire) only on resources carrying it
   (iam.py DESTRUCTIVE);
3. **wait** for the copy to be visible (NotFound right after CopyImage is normal) and `available` (a copy is
   `pending` for minutes; nothing below touches it before);
4. **tag** it and its snapshots again with CreateTags — the source's tags (except `aws:*` and the ones amiforge owns)
   and amiforge's: this covers an endpoint that ignored TagSpecifications, a copy an earlier version made with an
   untagged snapshot, and a source whose tags changed; **share** it: launch permission for accounts, organization
   ARNs and OU ARNs, create-volume permission on its snapshots for the accounts (org/OU grants do not exist for
   snapshots), `Group=all` only for a public plan; and **protect** it against deregistration.

The source image is shared the same way (before any copy), so consumers in the bake region launch it directly; a
plan may have no target region at all and only share.

Every step after the copy is idempotent (Add of an existing permission, CreateTags of an existing tag, enabling
protection twice), so a rerun simply repeats them: interrupted after any API call, the next run converges to the same
state with no duplicate copy and no orphan. Safety (docs/architecture.md §8): nothing is public without `public=True`.

Encryption, checked by `preflight()` before anything is shared or copied whenever the plan shares outside the account
(EC2 refuses to share what is encrypted under an AWS-managed key — ModifyImageAttribute and ModifySnapshotAttribute
fail — and an encrypted image cannot be public; receivers a key's policy leaves out cannot launch the image):
- the source's snapshots (DescribeSnapshots): under an AWS-managed key, refused; under a customer key, its policy is
  read for the receivers (key_policy.key_access): "refused" refuses, "conditional" is a note (logged as a warning);
- each target's kms_key: the same, and that it is an enabled symmetric key of its region;
- a target without kms_key whose copy would be encrypted — the source is, or the region encrypts by default —
  refused: CopyImage without KmsKeyId puts the copy under the region's default EBS key (the AWS-managed aws/ebs unless
  another was made the default), which this plan never named.

Parallelism: one worker per region, at most `max_parallel_regions` at once. Each region has exactly one copy in
flight, far below AWS's per-destination-region limit on concurrent copies; API throttling is left to botocore's
standard retry mode (clients.py).
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from amiforge.awsapi.clients import AwsSession, call, eventually, paginate
from amiforge.errors import ConfigError, InfraError, NotFound, Problem, StateError
from amiforge.model import AWS_REGION_RE
from amiforge.providers.aws.images import MANAGED_TAG, describe_image
from amiforge.providers.aws.key_policy import audiences, grant_fix, key_access, parse_policy, refusals
from amiforge.waiting import Wait

log = logging.getLogger(__name__)

__all__ = [
    "RUN_TAG",
    "SOURCE_IMAGE_TAG",
    "SOURCE_REGION_TAG",
    "DistributionPlan",
    "DistributionResult",
    "PreflightReport",
    "Progress",
    "RegionResult",
    "RegionTarget",
    "ShareTargets",
    "client_token",
    "distribute",
    "plan_distribution",
    "preflight",
    "protect",
]

RUN_TAG = "amiforge:run"
SOURCE_IMAGE_TAG = "amiforge:source-image"
SOURCE_REGION_TAG = "amiforge:source-region"
# What CopyImage's TagSpecifications tag: the new AMI and every new snapshot (no other ResourceType is accepted).
_COPY_TAGGED = ("image", "snapshot")
# Tags amiforge sets on a copy itself; the source's values for them are not carried over.
_OWN_TAGS = {MANAGED_TAG, RUN_TAG, SOURCE_IMAGE_TAG, SOURCE_REGION_TAG}

_IMAGE_RE = re.compile(r"ami-[0-9a-f]{8,17}")
_REGION_RE = AWS_REGION_RE
_ACCOUNT_RE = re.compile(r"[0-9]{12}")
_ORG_RE = re.compile(r"arn:aws[a-z-]*:organizations::[0-9]{12}:organization/o-[a-z0-9]{10,32}")
_OU_RE = re.compile(r"arn:aws[a-z-]*:organizations::[0-9]{12}:ou/o-[a-z0-9]{10,32}/ou-[0-9a-z]{4,32}-[a-z0-9]{8,32}")
_RUN_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_KMS_REGION_RE = re.compile(r"arn:aws[a-z-]*:kms:([a-z0-9-]+):")

# Looks at a pending copy: large images take tens of minutes to copy across regions; a copy may stay pending 3 h.
COPY_WAIT = Wait(first_delay=1.0, max_delay=30.0, deadline=3 * 3600.0)


@dataclass(frozen=True)
class RegionTarget:
    """One destination region, and the KMS key (id, ARN or alias) its copy is encrypted with; None keeps the
    source's encryption (unencrypted stays unencrypted)."""

    region: str
    kms_key: str | None = None


@dataclass(frozen=True)
class ShareTargets:
    """Who may launch the copies besides the owner: account ids, organization ARNs, organizational-unit ARNs."""

    accounts: tuple[str, ...] = ()
    org_arns: tuple[str, ...] = ()
    ou_arns: tuple[str, ...] = ()

    @property
    def any(self) -> bool:
        return bool(self.accounts or self.org_arns or self.ou_arns)

    def launch_permissions(self, public: bool) -> list[dict[str, str]]:
        permissions = [{"UserId": a} for a in self.accounts]
        permissions += [{"OrganizationArn": a} for a in self.org_arns]
        permissions += [{"OrganizationalUnitArn": a} for a in self.ou_arns]
        if public:
            permissions.append({"Group": "all"})
        return permissions

    def describe(self, public: bool) -> tuple[str, ...]:
        return (*self.accounts, *self.org_arns, *self.ou_arns, *(("all",) if public else ()))


@dataclass(frozen=True)
class DistributionPlan:
    """What `distribute` does: copy `source_image_id` (in `source_region`) to each target, share it, under `run_id`.
    Build it with `plan_distribution()`, which validates it."""

    source_image_id: str
    source_region: str
    targets: tuple[RegionTarget, ...]
    share: ShareTargets
    public: bool
    run_id: str

    @property
    def shares_outside_account(self) -> bool:
        return self.public or self.share.any


@dataclass(frozen=True)
class RegionResult:
    """One region's copy: its id, whether an earlier run had made it (`adopted`), and whom it is shared with."""

    region: str
    image_id: str
    adopted: bool
    shared_with: tuple[str, ...]
    kms_key_arn: str | None
    protected: bool = True


@dataclass(frozen=True)
class DistributionResult:
    source_image_id: str
    source_region: str
    run_id: str
    regions: tuple[RegionResult, ...]

    @property
    def image_ids(self) -> dict[str, str]:
        """Region → image id."""
        return {r.region: r.image_id for r in self.regions}


@dataclass(frozen=True)
class PreflightReport:
    """What preflight learnt and distribute needs: the source's name, description and tags, and each target's key
    resolved to its ARN (region → ARN or None); `notes`: what it could not decide (also logged as warnings)."""

    source_name: str
    source_description: str
    source_tags: tuple[tuple[str, str], ...]
    kms_key_arns: Mapping[str, str | None] = field(default_factory=dict)
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Progress:
    """One step done in one region. `step` is adopted, copying, copied, available, tagged, shared, protected, done."""

    region: str
    step: str
    image_id: str | None = None


ProgressCallback = Callable[[Progress], None]


# --- planning -----------------------------------------------------------------------------------------------------


def plan_distribution(
    source_image_id: str,
    source_region: str,
    targets: Sequence[RegionTarget],
    *,
    run_id: str,
    accounts: Sequence[str] = (),
    org_arns: Sequence[str] = (),
    ou_arns: Sequence[str] = (),
    public: bool = False,
    public_flag: bool = False,
) -> DistributionPlan:
    """A validated plan, or ConfigError listing every problem. `public` is what the recipe asks for; `public_flag`
    is the command line's `--public`: a public distribution needs both (docs/architecture.md §8)."""
    problems: list[Problem] = []

    def problem(fieldname: str, message: str, fix: str) -> None:
        problems.append(Problem(message, field=fieldname, fix=fix))

    if not _IMAGE_RE.fullmatch(source_image_id):
        problem("source", f"{source_image_id!r} is not an image id", "an image id looks like ami-0123456789abcdef0")
    if not _REGION_RE.fullmatch(source_region):
        problem("source", f"{source_region!r} is not an AWS region", "use a region name such as us-east-1")
    if not _RUN_RE.fullmatch(run_id):
        problem("run_id", f"{run_id!r} is not a run id", "letters, digits, . _ : -, at most 128 characters")
    if not targets and not (public or accounts or org_arns or ou_arns):
        problem(
            "regions", "no target region and no one to share with", "list a region to copy to, or whom to share with"
        )
    seen: set[str] = set()
    for i, target in enumerate(targets):
        where = f"regions[{i}]"
        if not _REGION_RE.fullmatch(target.region):
            problem(where, f"{target.region!r} is not an AWS region", "use a region name such as eu-west-1")
        if target.region == source_region:
            problem(where, f"{target.region} is the source region", "the image is already there; drop that region")
        if target.region in seen:
            problem(where, f"{target.region} is listed twice", "list each region once")
        seen.add(target.region)
        if target.kms_key is not None and not target.kms_key.strip():
            problem(where, "kms_key is empty", "name a key id, key ARN or alias, or leave kms_key out")
        match = _KMS_REGION_RE.match(target.kms_key or "")
        if match and match.group(1) != target.region:
            problem(where, f"kms_key {target.kms_key} lives in {match.group(1)}", "use a key in the target region")
    for i, account in enumerate(accounts):
        if not _ACCOUNT_RE.fullmatch(account):
            problem(f"share.accounts[{i}]", f"{account!r} is not an account id", "an account id is 12 digits")
    for i, arn in enumerate(org_arns):
        if not _ORG_RE.fullmatch(arn):
            problem(
                f"share.org_arns[{i}]",
                f"{arn!r} is not an organization ARN",
                "arn:aws:organizations::<management account>:organization/o-<id>",
            )
    for i, arn in enumerate(ou_arns):
        if not _OU_RE.fullmatch(arn):
            problem(
                f"share.ou_arns[{i}]",
                f"{arn!r} is not an organizational-unit ARN",
                "arn:aws:organizations::<management account>:ou/o-<org id>/ou-<id>",
            )
    if public and not public_flag:
        problem("public", "the recipe shares the image publicly without --public", "pass --public, or drop public")
    if public_flag and not public:
        problem("public", "--public was passed but the recipe does not share publicly", "set public: true or drop it")
    if public and any(t.kms_key for t in targets):
        problem("public", "an encrypted image cannot be made public", "drop public, or the regions' kms_key")
    if problems:
        summary = "; ".join(f"{p.field}: {p.message}" for p in problems)
        raise ConfigError(
            f"distribution of {source_image_id} has {len(problems)} problem(s): {summary}", problems=problems
        )
    return DistributionPlan(
        source_image_id=source_image_id,
        source_region=source_region,
        targets=tuple(targets),
        share=ShareTargets(
            tuple(dict.fromkeys(accounts)), tuple(dict.fromkeys(org_arns)), tuple(dict.fromkeys(ou_arns))
        ),
        public=public,
        run_id=run_id,
    )


def client_token(plan: DistributionPlan, region: str) -> str:
    """The CopyImage ClientToken for `region`: the same for every rerun of the same run, unique otherwise (≤ 64)."""
    digest = hashlib.sha256(f"{plan.run_id}\0{plan.source_image_id}\0{region}".encode()).hexdigest()
    return f"amiforge-{digest[:48]}"


# --- preflight ----------------------------------------------------------------------------------------------------


def preflight(plan: DistributionPlan, session: AwsSession) -> PreflightReport:
    """Check, before anything is created or shared: the source exists and is available; each target's KMS key exists
    in its region, is enabled and a symmetric ENCRYPT_DECRYPT key; and, when the plan shares outside the account, the
    encryption rules of the module docstring (source key, target keys, targets without a key). Every problem is listed
    in one ConfigError. Read-only."""
    source = describe_image(session, plan.source_region, plan.source_image_id)
    where = f"{plan.source_image_id} in {plan.source_region}"
    if source.get("State") != "available":
        raise StateError(f"source image {where} is {source.get('State')!r}, not available", fix="wait, then re-run")
    checked = _Checked()
    arns: dict[str, str | None] = {}
    for target in plan.targets:
        arns[target.region] = None
        if target.kms_key is not None:
            name = f"kms_key {target.kms_key} in {target.region}"
            arns[target.region] = _check_key(session, plan, target.region, target.kms_key, name, checked)
    if plan.shares_outside_account:
        _check_source_encryption(session, plan, source, checked)
    if checked.problems:
        raise ConfigError(
            f"preflight refused distributing {where}: nothing was copied",
            problems=checked.problems,
        )
    for note in checked.notes:
        log.warning("distribute %s: %s", plan.source_image_id, note)
    return PreflightReport(
        source_name=str(source.get("Name") or plan.source_image_id),
        source_description=str(source.get("Description") or ""),
        source_tags=tuple(
            sorted(
                (str(t["Key"]), str(t["Value"]))
                for t in source.get("Tags", [])
                if t["Key"] not in _OWN_TAGS and not str(t["Key"]).startswith("aws:")
            )
        ),
        kms_key_arns=arns,
        notes=tuple(checked.notes),
    )


@dataclass
class _Checked:
    """What preflight found: problems refuse the plan, notes do not."""

    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def problem(self, message: str, where: str, fix: str) -> None:
        self.problems.append(Problem(message, field=where, fix=fix))


_SHARE_UNDER_DEFAULT = (
    "CopyImage without a KmsKeyId puts the copy under the region's default EBS key (the AWS-managed aws/ebs unless "
    "another was made the default), which this plan does not name and EC2 will not share if it is AWS-managed"
)


def _check_source_encryption(
    session: AwsSession, plan: DistributionPlan, source: Mapping[str, Any], checked: _Checked
) -> None:
    """A plan that shares outside the account: the source's snapshots' keys, and the targets without a key."""
    where = f"source {plan.source_image_id} in {plan.source_region}"
    keyless = [t.region for t in plan.targets if t.kms_key is None]
    snapshots = _source_snapshots(session, plan.source_region, source)
    encrypted = [s for s in snapshots if s.get("Encrypted")]
    if not encrypted:
        for region in keyless:
            if _encrypts_by_default(session, region):
                fix = (
                    f"turn EBS encryption by default off in {region} or drop the region (a public image cannot be "
                    "encrypted)"
                    if plan.public
                    else "give the region a customer-managed kms_key whose policy lets the receivers use it"
                )
                checked.problem(
                    f"EBS encryption by default is on in {region}, which has no kms_key: the copy would be encrypted; "
                    + ("an encrypted image cannot be made public" if plan.public else _SHARE_UNDER_DEFAULT),
                    f"regions[{region}].kms_key",
                    fix,
                )
        return
    if plan.public:
        checked.problem(
            f"{where} is encrypted: an encrypted image cannot be made public",
            "public",
            "drop public, or distribute an image baked unencrypted",
        )
    elif keyless:
        checked.problem(
            f"{where} is encrypted and {', '.join(keyless)} has no kms_key: {_SHARE_UNDER_DEFAULT}",
            "regions",
            "give those regions a customer-managed kms_key whose policy lets the receivers use it",
        )
    keys = dict.fromkeys(str(s.get("KmsKeyId") or "") for s in encrypted)
    for key in keys:
        if not key:
            checked.problem(
                f"{where} has an encrypted snapshot whose key EC2 does not name: whether it can be shared is unknown",
                "source",
                "check the source's snapshots (aws ec2 describe-snapshots), or distribute another image",
            )
        else:
            _check_key(session, plan, plan.source_region, key, f"{where} is encrypted under {key}", checked)


def _source_snapshots(session: AwsSession, region: str, image: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The source image's EBS snapshots as DescribeSnapshots gives them: their encryption and KmsKeyId."""
    ids = _snapshots(image)
    if not ids:
        return []
    ec2 = session.client("ec2", region)
    return list(paginate(ec2, "DescribeSnapshots", "Snapshots", ", ".join(ids), page_size=None, SnapshotIds=ids))


def _encrypts_by_default(session: AwsSession, region: str) -> bool:
    ec2 = session.client("ec2", region)
    return bool(
        call(ec2, "GetEbsEncryptionByDefault", f"EBS encryption by default in {region}")["EbsEncryptionByDefault"]
    )


def _check_key(
    session: AwsSession, plan: DistributionPlan, region: str, key: str, name: str, checked: _Checked
) -> str | None:
    """A key an image of the plan is (or will be) under, in `region`: it exists there, is enabled and a symmetric
    encryption key; when the plan shares outside the account, it is not AWS-managed and its policy lets the receivers
    use it. Returns its ARN (None if it cannot be described)."""
    field_name = "source" if region == plan.source_region else f"regions[{region}].kms_key"
    kms = session.client("kms", region)
    try:
        meta = call(kms, "DescribeKey", key, KeyId=key)["KeyMetadata"]
    except (NotFound, ConfigError) as e:
        checked.problem(f"{name}: {e.message}", field_name, e.fix or "check the key and its region")
        return None
    arn = str(meta.get("Arn") or "")
    state = str(meta.get("KeyState") or ("Enabled" if meta.get("Enabled") else "Disabled"))
    if state != "Enabled" or meta.get("Enabled") is False:
        checked.problem(f"{name}: the key is {state}", field_name, "enable the key or configure another")
    usage = meta.get("KeyUsage") or "ENCRYPT_DECRYPT"
    spec = meta.get("KeySpec") or meta.get("CustomerMasterKeySpec") or "SYMMETRIC_DEFAULT"
    if usage != "ENCRYPT_DECRYPT" or spec != "SYMMETRIC_DEFAULT":
        checked.problem(f"{name}: a {spec} {usage} key", field_name, "EBS needs a symmetric encryption key")
    match = _KMS_REGION_RE.match(arn)
    if match and match.group(1) != region:
        checked.problem(f"{name}: the key lives in {match.group(1)}", field_name, "use a key of that region")
    if not plan.shares_outside_account:
        return arn or None
    if meta.get("KeyManager") == "AWS":
        checked.problem(
            f"{name}: an AWS-managed key, and an image encrypted with it cannot be shared with other accounts",
            field_name,
            "use a customer-managed key whose policy lets the shared accounts use it",
        )
    elif plan.share.any and arn:
        _check_key_policy(kms, plan, region, arn, name, field_name, checked)
    return arn or None


def _check_key_policy(
    kms: Any, plan: DistributionPlan, region: str, arn: str, name: str, field_name: str, checked: _Checked
) -> None:
    """The key policy read for the receivers (key_policy.py): what it certainly refuses refuses the plan; what a
    static read cannot decide, or a policy that cannot be read, is a note."""
    try:
        text = str(call(kms, "GetKeyPolicy", f"the policy of {arn}", KeyId=arn, PolicyName="default")["Policy"])
        policy = parse_policy(text)
    except (ConfigError, NotFound, ValueError) as e:
        checked.notes.append(f"{name}: its key policy could not be read ({e}); the receivers may not be able to use it")
        return
    receivers = audiences(plan.share.accounts, plan.share.org_arns, plan.share.ou_arns)
    verdicts = [key_access(policy, a, key_arn=arn, region=region) for a in receivers]
    refused = refusals(verdicts)
    if refused is not None:
        checked.problem(f"{name}: its key policy refuses the receivers: {refused}", field_name, grant_fix(verdicts))
        return
    conditional = [v for v in verdicts if v.verdict == "conditional"]
    if conditional:
        reasons = sorted({w for v in conditional for w in v.why})
        who = ", ".join(v.audience.label for v in conditional)
        checked.notes.append(
            f"{name}: {who} may use the key only under what a static read of its policy cannot decide "
            f"({'; '.join(reasons)})"
        )


# --- distribution -------------------------------------------------------------------------------------------------


def protect(client: Any, image_id: str, *, cooldown: bool = False) -> None:
    """Turn on deregistration protection for `image_id` (idempotent on AWS). A function of its own because moto
    5.2.5 does not implement EnableImageDeregistrationProtection: tests emulate that one call with a `before-call`
    handler (tests/integration/aws/distribute_fixtures.py) rather than faking this module."""
    call(client, "EnableImageDeregistrationProtection", image_id, ImageId=image_id, WithCooldown=cooldown)


class _Pending(StateError):
    """A copy that exists but is not available yet (retried by `eventually`)."""


def distribute(
    plan: DistributionPlan,
    session: AwsSession,
    *,
    max_parallel_regions: int = 8,
    on_progress: ProgressCallback | None = None,
    copy_wait: Wait = COPY_WAIT,
) -> DistributionResult:
    """Preflight, then converge every target region (in parallel, at most `max_parallel_regions` at once).

    Safe to re-run with the same plan at any time: what exists is adopted, never copied twice. If some regions fail,
    the others still finish; the first failure (in target order) is raised, with the other failed regions noted.
    `on_progress` is called from worker threads."""
    if max_parallel_regions < 1:
        raise ConfigError(f"max_parallel_regions is {max_parallel_regions}; it must be at least 1")
    report = preflight(plan, session)
    notify: ProgressCallback = on_progress or (lambda _: None)
    # The source is shared like its copies: consumers in the bake region launch it, not a copy.
    if plan.shares_outside_account:
        source = describe_image(session, plan.source_region, plan.source_image_id)
        _share(session.client("ec2", plan.source_region), plan.source_image_id, source, plan)
        notify(Progress(plan.source_region, "shared", plan.source_image_id))
    if not plan.targets:
        return DistributionResult(plan.source_image_id, plan.source_region, plan.run_id, ())
    workers = min(max_parallel_regions, len(plan.targets))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="amiforge-distribute") as pool:
        futures: list[tuple[RegionTarget, Future[RegionResult]]] = [
            (t, pool.submit(_converge, plan, session, report, t, notify, copy_wait)) for t in plan.targets
        ]
        outcomes: list[tuple[RegionTarget, RegionResult | Exception]] = []
        for target, future in futures:
            try:
                outcomes.append((target, future.result()))
            except Exception as e:  # collected; the first is re-raised below
                outcomes.append((target, e))
    failures = [(t, o) for t, o in outcomes if isinstance(o, Exception)]
    if failures:
        first = failures[0][1]
        if len(failures) > 1:
            first.add_note("also failed: " + ", ".join(f"{t.region} ({type(o).__name__})" for t, o in failures[1:]))
        raise first
    results = tuple(o for _, o in outcomes if isinstance(o, RegionResult))
    return DistributionResult(plan.source_image_id, plan.source_region, plan.run_id, results)


def _converge(
    plan: DistributionPlan,
    session: AwsSession,
    report: PreflightReport,
    target: RegionTarget,
    notify: ProgressCallback,
    copy_wait: Wait,
) -> RegionResult:
    region = target.region
    ec2 = session.client("ec2", region)
    own_tags = {
        MANAGED_TAG: "true",
        RUN_TAG: plan.run_id,
        SOURCE_IMAGE_TAG: plan.source_image_id,
        SOURCE_REGION_TAG: plan.source_region,
    }
    tags = [{"Key": k, "Value": v} for k, v in (*report.source_tags, *own_tags.items())]

    image_id = _adopt(ec2, plan, region)
    adopted = image_id is not None
    if image_id is not None:
        notify(Progress(region, "adopted", image_id))
    else:
        notify(Progress(region, "copying"))
        kms_arn = report.kms_key_arns.get(region)
        encryption: dict[str, Any] = {"Encrypted": True, "KmsKeyId": kms_arn} if kms_arn else {}
        image_id = str(
            call(
                ec2,
                "CopyImage",
                f"{plan.source_image_id} → {region}",
                SourceImageId=plan.source_image_id,
                SourceRegion=plan.source_region,
                Name=report.source_name,
                Description=report.source_description or f"copy of {plan.source_image_id} by amiforge",
                ClientToken=client_token(plan, region),
                TagSpecifications=[{"ResourceType": kind, "Tags": tags} for kind in _COPY_TAGGED],
                **encryption,
            )["ImageId"]
        )
        notify(Progress(region, "copied", image_id))

    image = _wait_available(session, region, image_id, copy_wait)
    notify(Progress(region, "available", image_id))

    # Again, even for a fresh copy: converges an endpoint that ignored TagSpecifications, an adopted copy whose
    # snapshots were left untagged, and a source whose tags changed since an earlier run.
    call(ec2, "CreateTags", image_id, Resources=[image_id, *_snapshots(image)], Tags=tags)
    notify(Progress(region, "tagged", image_id))

    _share(ec2, image_id, image, plan)
    notify(Progress(region, "shared", image_id))

    if not str(image.get("DeregistrationProtection") or "").startswith("enabled"):
        protect(ec2, image_id)
    notify(Progress(region, "protected", image_id))
    notify(Progress(region, "done", image_id))
    return RegionResult(
        region=region,
        image_id=image_id,
        adopted=adopted,
        shared_with=plan.share.describe(plan.public),
        kms_key_arn=report.kms_key_arns.get(region),
    )


def _share(ec2: Any, image_id: str, image: Mapping[str, Any], plan: DistributionPlan) -> None:
    """Launch permission for the plan's accounts, organizations and OUs (and everyone if public); create-volume
    permission on the image's snapshots for the accounts (org/OU grants do not exist for snapshots). Idempotent."""
    permissions = plan.share.launch_permissions(plan.public)
    if permissions:
        call(ec2, "ModifyImageAttribute", image_id, ImageId=image_id, LaunchPermission={"Add": permissions})
    if not plan.share.accounts:
        return
    for snapshot in _snapshots(image):
        call(
            ec2,
            "ModifySnapshotAttribute",
            snapshot,
            SnapshotId=snapshot,
            Attribute="createVolumePermission",
            # The OperationType/UserIds form: equivalent on AWS, and the one moto understands (it silently
            # ignores CreateVolumePermission={"Add": [...]}).
            OperationType="add",
            UserIds=list(plan.share.accounts),
        )


def _snapshots(image: Mapping[str, Any]) -> list[str]:
    """The EBS snapshots behind an image, from its block device mappings."""
    return [
        str(m["Ebs"]["SnapshotId"]) for m in image.get("BlockDeviceMappings", []) if m.get("Ebs", {}).get("SnapshotId")
    ]


def _adopt(ec2: Any, plan: DistributionPlan, region: str) -> str | None:
    """The copy an earlier run of this plan made in this region, if any. More than one would be a bug (the tags and
    the ClientToken both prevent it): refused rather than guessed."""
    filters = [
        {"Name": f"tag:{SOURCE_IMAGE_TAG}", "Values": [plan.source_image_id]},
        {"Name": f"tag:{RUN_TAG}", "Values": [plan.run_id]},
    ]
    found = [
        i
        for i in paginate(
            ec2,
            "DescribeImages",
            "Images",
            f"copies of {plan.source_image_id} in {region}",
            Owners=["self"],
            Filters=filters,
        )
        if i.get("State") not in ("deregistered",)
    ]
    if not found:
        return None
    if len(found) > 1:
        ids = ", ".join(sorted(str(i["ImageId"]) for i in found))
        raise StateError(
            f"{len(found)} copies of {plan.source_image_id} from run {plan.run_id} in {region}: {ids}",
            fix="deregister all but one of them, then re-run",
        )
    image = found[0]
    if image.get("State") in ("failed", "error", "invalid"):
        raise StateError(
            f"the copy {image['ImageId']} of {plan.source_image_id} in {region} is {image.get('State')}",
            fix="deregister it and distribute again under a new run id (AWS remembers the copy's ClientToken)",
        )
    return str(image["ImageId"])


def _wait_available(session: AwsSession, region: str, image_id: str, wait: Wait) -> Mapping[str, Any]:
    def available() -> Mapping[str, Any]:
        image = describe_image(session, region, image_id)
        state = image.get("State")
        if state == "available":
            return image
        if state == "pending":
            raise _Pending(f"copy {image_id} in {region} is still pending")
        raise InfraError(
            f"copy {image_id} in {region} is {state}: {image.get('StateReason', {}).get('Message', '')}",
            retryable=False,
            fix="deregister it and distribute again under a new run id",
        )

    try:
        return eventually(
            available,
            retry_on=(NotFound, _Pending),
            timeout=wait.deadline,
            first_delay=wait.first_delay,
            max_delay=wait.max_delay,
            sleep=wait.sleep,
            clock=wait.clock,
        )
    except _Pending as e:
        raise StateError(e.message, fix="the copy continues on AWS: re-run distribute later to adopt it") from e
