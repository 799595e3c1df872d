"""What moto 5.2.5 lacks or does too slowly for these tests, emulated in-process (tested in test_moto_emulation.py).

- Paging (`PagingEmulation`): moto ignores MaxResults/NextToken on DescribeImages and DescribeSnapshots, pages
  DescribeInstances its own way (default 100), and cuts DescribeLaunchTemplates and DescribeLaunchTemplateVersions
  at MaxResults (default 15) with no NextToken: a reader of the first page never learns there were more. The
  emulation wraps moto's response methods so each answers the way EC2 does: without MaxResults (and no NextToken)
  everything in one answer; with it, at most MaxResults items (≤ 1000) and an opaque NextToken bound to the
  request's other parameters. `page_cap` makes the "server" return shorter pages
  than asked for, as EC2 may: code must follow NextToken, never assume a short page is the last. Slicing happens
  before moto serialises the answer, so a page costs what its items cost, as on AWS.
- Tag lookup (`fast_tag_lookup`): moto finds a resource's tags by scanning every tag of the region with regexes, so
  describing N tagged images costs O(N²) (2500 images: ~8 s per DescribeImages). The shim reads the same dict
  directly and returns the same records in the same order.
- Faults (`FaultInjector`): a botocore `before-send` handler answers some sends itself, before moto: throttling on a
  seeded pseudo-random share of sends, and InvalidAMIID.NotFound for the first DescribeImages of an image created
  moments ago. A faulted send never reaches moto (see `_NOWHERE`), so a throttled create creates nothing. Both go
  through botocore's real response parsing and retry handler (standard mode retries the throttling; NotFound
  reaches the caller, as on AWS).
- Shared images (`shared_images`): moto keeps each account's images in that account's backend, so an image shared
  with another account (a launch permission for its id) is invisible there. The shim lets DescribeImages in an
  account also see the images of other accounts (same region) that grant it a launch permission, as EC2 does.
- Call counting (`ApiCalls`): `before-call` fires once per API call (not per retry attempt), per page of a paginator.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qs

import pytest
from botocore.awsrequest import AWSResponse
from moto.core.responses import ActionResult
from moto.ec2.exceptions import EC2ClientError
from moto.ec2.models import ec2_backends
from moto.ec2.models.amis import AmiBackend
from moto.ec2.models.core import TaggedEC2Resource
from moto.ec2.responses.amis import AmisResponse
from moto.ec2.responses.elastic_block_store import ElasticBlockStore
from moto.ec2.responses.instances import InstanceResponse
from moto.ec2.responses.launch_templates import LaunchTemplates
from moto.ec2.utils import EC2_PREFIX_TO_RESOURCE, get_prefix

# EC2's documented ceiling: a larger MaxResults is answered with 1000 items.
EC2_MAX_PAGE = 1000
# Request parameters that are not part of "the same request" across pages.
_PAGING_PARAMS = {"MaxResults", "NextToken", "Action", "Version"}


class PagingEmulation:
    """MaxResults/NextToken for DescribeImages, DescribeSnapshots and DescribeInstances on moto."""

    def __init__(self) -> None:
        self.page_cap: int | None = None  # the "server" returns at most this many items per page

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        emulation = self
        images = AmisResponse.describe_images
        snapshots = ElasticBlockStore.describe_snapshots

        def describe_images(resp: Any) -> ActionResult:
            emulation._check(resp, "ImageIds")
            return emulation._page(resp, "Images", images(resp).result)

        def describe_snapshots(resp: Any) -> ActionResult:
            emulation._check(resp, "SnapshotIds")
            return emulation._page(resp, "Snapshots", snapshots(resp).result)

        def describe_instances(resp: Any) -> ActionResult:
            # moto pages instances itself (100 by default, its own token); replace that with EC2's behaviour.
            resp.error_on_dryrun()
            emulation._check(resp, "InstanceIds")
            filters = resp._filters_from_querystring()
            ids = resp._get_param("InstanceIds", [])
            backend = resp.ec2_backend
            if ids:
                reservations = backend.get_reservations_by_instance_ids(ids, filters=filters)
            else:
                reservations = backend.describe_instances(filters=filters)
            return emulation._page(resp, "Reservations", {"Reservations": reservations})

        def whole(method: Any, key: str) -> Any:
            def answer(resp: Any) -> ActionResult:
                asked = resp._get_int_param

                def unbounded(name: str, if_none: Any = None) -> Any:
                    return 10**9 if name == "MaxResults" else asked(name, if_none)

                resp._get_int_param = unbounded  # moto's own cut at MaxResults: everything, then EC2's pages
                try:
                    result = method(resp).result
                finally:
                    del resp._get_int_param
                return emulation._page(resp, key, result)

            return answer

        for name, key in (("describe_launch_templates", "LaunchTemplates"),
                          ("describe_launch_template_versions", "LaunchTemplateVersions")):  # fmt: skip
            monkeypatch.setattr(LaunchTemplates, name, whole(getattr(LaunchTemplates, name), key))
        monkeypatch.setattr(AmisResponse, "describe_images", describe_images)
        monkeypatch.setattr(ElasticBlockStore, "describe_snapshots", describe_snapshots)
        monkeypatch.setattr(InstanceResponse, "describe_instances", describe_instances)

    @staticmethod
    def _check(resp: Any, ids_param: str) -> None:
        if resp._get_param(ids_param) and resp._get_param("MaxResults") is not None:
            # EC2 refuses paging a request for explicit ids.
            raise EC2ClientError(
                "InvalidParameterCombination", f"The parameter {ids_param} cannot be used with the parameter maxResults"
            )

    @staticmethod
    def _fingerprint(resp: Any) -> str:
        params = {k: v for k, v in sorted(resp.querystring.items()) if k not in _PAGING_PARAMS}
        return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]

    def _page(self, resp: Any, key: str, result: Any) -> ActionResult:
        items = list(result[key])
        max_results = resp._get_param("MaxResults")
        token = resp._get_param("NextToken")
        if max_results is None and token is None:
            return ActionResult({**result, key: items})
        size = min(int(max_results) if max_results is not None else EC2_MAX_PAGE, EC2_MAX_PAGE)
        if size < 1:
            raise EC2ClientError("InvalidParameterValue", f"MaxResults {max_results} must be positive")
        if self.page_cap is not None:
            size = min(size, self.page_cap)
        fingerprint = self._fingerprint(resp)
        start = 0
        if token is not None:
            try:
                decoded = json.loads(base64.urlsafe_b64decode(str(token)))
                start, bound = int(decoded["o"]), str(decoded["q"])
            except (ValueError, KeyError, TypeError) as e:
                raise EC2ClientError("InvalidParameterValue", "Invalid value for NextToken") from e
            if bound != fingerprint:
                raise EC2ClientError("InvalidParameterValue", "NextToken was issued for a different request")
        page = items[start : start + size]
        following = start + len(page)
        answer = {**result, key: page}
        answer.pop("NextToken", None)
        if following < len(items):
            answer["NextToken"] = base64.urlsafe_b64encode(
                json.dumps({"o": following, "q": fingerprint}).encode()
            ).decode()
        return ActionResult(answer)


def fast_tag_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    """Replace moto's O(all tags) per-resource tag lookup by a dict read with the same output."""

    def get_tags(resource: Any) -> list[dict[str, str]]:
        if not resource.id:
            return []
        tags = resource.ec2_backend.tags.get(resource.id, {})
        kind = EC2_PREFIX_TO_RESOURCE.get(get_prefix(resource.id), "")
        return [{"resource_id": resource.id, "key": k, "value": v, "resource_type": kind} for k, v in tags.items()]

    monkeypatch.setattr(TaggedEC2Resource, "get_tags", get_tags)


# --- faults ---------------------------------------------------------------------------------------------------


class _Raw:
    """The least of a urllib3 response botocore needs to read a body."""

    def __init__(self, body: bytes) -> None:
        self._body = body

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self._body


def error_response(url: str, service: str, code: str, status: int = 400) -> AWSResponse:
    """An AWS error answer in the wire format of `service`'s protocol."""
    message = f"injected by the test: {code}"
    if service == "ec2":
        body = (
            f"<Response><Errors><Error><Code>{code}</Code><Message>{message}</Message></Error></Errors>"
            "<RequestID>injected</RequestID></Response>"
        ).encode()
        headers = {"Content-Type": "text/xml"}
    elif service in ("sts", "iam", "auto-scaling"):  # query protocol; events name Auto Scaling "auto-scaling"
        body = (
            f"<ErrorResponse><Error><Type>Sender</Type><Code>{code}</Code><Message>{message}</Message></Error>"
            "<RequestId>injected</RequestId></ErrorResponse>"
        ).encode()
        headers = {"Content-Type": "text/xml"}
    else:  # JSON protocols: ssm, kms
        body = json.dumps({"__type": code, "message": message}).encode()
        headers = {"Content-Type": "application/x-amz-json-1.1"}
    return AWSResponse(url, status, headers, _Raw(body))


# botocore emits `before-send` to *every* handler and takes the first non-None answer: an injected answer does not
# stop moto's handler (registered later) from executing the request. A throttled CreateImage would then still create
# an image in moto — a side effect AWS never has. Pointing the request at a reserved name no moto backend matches
# makes moto pass it through untouched; our answer, being first, is the one botocore uses.
_NOWHERE = "https://amiforge-injected-fault.invalid/"

THROTTLE_CODES = {"ec2": "RequestLimitExceeded", "sts": "Throttling", "auto-scaling": "Throttling"}
_CREATES = {"CreateImage", "CopyImage", "RegisterImage"}


class FaultInjector:
    """Throttles a seeded pseudo-random `rate` of sends; answers NotFound to the first `not_found_reads` Describes
    of each image id created while installed."""

    def __init__(self, *, seed: int = 20240501, rate: float = 0.3, not_found_reads: int = 1) -> None:
        self._rng = random.Random(seed)
        self.rate = rate
        self.not_found_reads = not_found_reads
        self._fresh: dict[str, int] = {}
        self.sends = 0
        self.injected: Counter[str] = Counter()

    def install(self, events: Any) -> None:
        # register_first: our answer must come before moto's own before-send handler answers the request.
        events.register_first("before-send", self._before_send)
        events.register("after-call.ec2", self._after_call)

    def _after_call(self, parsed: dict[str, Any], model: Any, **_: Any) -> None:
        if model.name in _CREATES and "ImageId" in parsed:
            self._fresh[str(parsed["ImageId"])] = self.not_found_reads

    def _before_send(self, request: Any, event_name: str, **_: Any) -> AWSResponse | None:
        self.sends += 1
        _before, service, operation = event_name.split(".", 2)
        if service == "ec2" and operation == "DescribeImages" and self._fresh:
            body = request.body.decode() if isinstance(request.body, bytes) else str(request.body or "")
            query = parse_qs(body)
            asked = [v[0] for k, v in query.items() if k.startswith("ImageId.")]
            for image_id in asked:
                if self._fresh.get(image_id, 0) > 0:
                    self._fresh[image_id] -= 1
                    self.injected["InvalidAMIID.NotFound"] += 1
                    return self._answer(request, service, "InvalidAMIID.NotFound")
        if self._rng.random() < self.rate:
            code = THROTTLE_CODES.get(service, "ThrottlingException")
            self.injected[code] += 1
            return self._answer(request, service, code)
        return None

    @staticmethod
    def _answer(request: Any, service: str, code: str) -> AWSResponse:
        response = error_response(request.url, service, code)
        request.url = _NOWHERE
        return response


class ApiCalls:
    """Counts API calls by (service, operation): `before-call` fires once per call, and once per page."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str]] = Counter()

    def install(self, events: Any) -> None:
        events.register("before-call", self._before_call)

    def _before_call(self, model: Any, **_: Any) -> None:
        self.counts[(model.service_model.service_name, model.name)] += 1

    def __getitem__(self, key: str) -> int:
        """`calls["ec2.DescribeImages"]`."""
        service, operation = key.split(".", 1)
        return self.counts[(service, operation)]

    def reset(self) -> None:
        self.counts.clear()


def no_backoff(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Make botocore's standard-mode backoff return 0 s (it really sleeps otherwise); returns the delays it chose."""
    from botocore.retries import standard

    chosen: list[float] = []
    original: Callable[..., float] = standard.ExponentialBackoff.delay_amount

    def delay_amount(self: Any, context: Any) -> float:
        chosen.append(original(self, context))
        return 0.0

    monkeypatch.setattr(standard.ExponentialBackoff, "delay_amount", delay_amount)
    return chosen


def shared_images(monkeypatch: pytest.MonkeyPatch) -> None:
    """DescribeImages also answers images other accounts shared with the caller's account (launch permission)."""
    original = AmiBackend.describe_images

    def describe_images(self: Any, *args: Any, **kwargs: Any) -> Any:
        shared = {
            ami.id: ami
            for account, backends in list(ec2_backends.items())
            if account != self.account_id
            for ami in backends[self.region_name].amis.values()
            if any(p.get("UserId") == self.account_id for p in ami.launch_permissions)
        }
        if not shared:
            return original(self, *args, **kwargs)
        own = self.amis
        self.amis = {**shared, **own}
        try:
            return original(self, *args, **kwargs)
        finally:
            self.amis = own

    monkeypatch.setattr(AmiBackend, "describe_images", describe_images)
