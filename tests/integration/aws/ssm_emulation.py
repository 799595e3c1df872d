"""SSM's asynchronous validation of `aws:ec2:image` parameters, emulated on moto (moto 5.2.5 stores any value at once,
even one that names no image; tested in test_publish.py).

What AWS documents (SSM API reference, PutParameter, DataType; user guide, "Native parameter support for Amazon
Machine Image IDs"):
- PutParameter with DataType `aws:ec2:image` answers HTTP 200 and the new Version before the value is validated:
  "a successful HTTP 200 response does not guarantee that your parameter was successfully created or updated".
- SSM then checks that the value is an AMI id in the required format and that the image is available in the account
  (and region). If it is, the parameter holds the value at that version; if not, "the parameter will not be created
  or updated", and the failure is reported as an EventBridge "Parameter Store Change" event.

The emulation (`SsmImageValidation`), on moto's SSM backend and response class:
- PutParameter of DataType `aws:ec2:image` runs moto's own checks (ParameterAlreadyExists, Tags with Overwrite, …)
  and answers moto's Version, but the new version is taken out of the backend again and kept as a pending validation.
- Every SSM request in an account and region is one tick of time. A pending validation completes at the first request
  after `reads` requests have seen the previous state: GetParameter, GetParameterHistory, DescribeParameters, … answer
  the previous value and version meanwhile, or ParameterNotFound for a new parameter (which moto also refuses to tag:
  AddTagsToResource → InvalidResourceId, as AWS does for a parameter that does not exist).
- On completion the image is looked up in EC2 *then* (so an image deregistered meanwhile fails, as on AWS): an id of
  the documented form naming an image of the account in that region, or one shared with the account or public, in
  state `available`. Valid: the version is stored (with the Tags the request carried). Invalid: nothing changes.
  Either way an event modelled on EventBridge's is appended to `events` (with `exception` on failure).
- A PutParameter of a name with a validation pending first completes that one (SSM applies writes in order).

Not emulated: EventBridge delivery itself, the writer's ssm:GetParameters / ec2:DescribeImages permissions, and the
100-version history limit for pending versions.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Any

import pytest
from moto.ec2.models import ec2_backends
from moto.ssm.models import Parameter, SimpleSystemManagerBackend
from moto.ssm.responses import SimpleSystemManagerResponse

IMAGE_DATA_TYPE = "aws:ec2:image"
_IMAGE_ID_RE = re.compile(r"ami-(?:[0-9a-f]{8}|[0-9a-f]{17})")
# The exception text AWS's "Parameter Store Change" event carries when the image cannot be found.
VALIDATION_FAILED = "Unable to Describe Resource"


@dataclass
class _Pending:
    name: str
    parameter: Parameter
    tags: dict[str, str]
    operation: str  # Create or Update, as the EventBridge event says
    reads: int


class SsmImageValidation:
    """Install with `install(monkeypatch)`; `reads` is how many SSM requests see the previous state."""

    def __init__(self, *, reads: int = 2) -> None:
        self.reads = reads
        self.events: list[dict[str, str]] = []
        self._pending: dict[tuple[str, str], list[_Pending]] = {}  # (account, region) → validations in order
        self._lock = threading.RLock()

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        emulation = self
        put_parameter = SimpleSystemManagerBackend.put_parameter
        call_action = SimpleSystemManagerResponse.call_action

        def put(backend: Any, name: str, *args: Any, **kwargs: Any) -> Parameter:
            with emulation._lock:
                emulation._complete(backend, lambda p: p.name == name)
                return emulation._put(backend, name, put_parameter, args, kwargs)

        def request(resp: Any) -> Any:
            with emulation._lock:
                emulation._tick(resp.ssm_backend)
            return call_action(resp)

        monkeypatch.setattr(SimpleSystemManagerBackend, "put_parameter", put)
        monkeypatch.setattr(SimpleSystemManagerResponse, "call_action", request)

    def pending(self, account: str, region: str) -> list[str]:
        """The names whose validation has not completed."""
        return [p.name for p in self._pending.get((account, region), [])]

    def _put(self, backend: Any, name: str, moto_put: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Parameter:
        data_type = kwargs["data_type"] if "data_type" in kwargs else args[7]
        if data_type != IMAGE_DATA_TYPE:
            return moto_put(backend, name, *args, **kwargs)  # type: ignore[no-any-return]
        existed = bool(backend._parameters.get(name))
        before = list(backend._parameters[name]) if existed else []
        tagged = backend._resource_tags["Parameter"]
        tags_before = dict(tagged[name]) if name in tagged else None
        parameter: Parameter = moto_put(backend, name, *args, **kwargs)  # moto's synchronous checks, and the Version
        # Not there until validated: put back what was there, tags included (they come with a successful create).
        tags = dict(tagged.get(name, {}))
        if existed:
            backend._parameters[name][:] = before
        else:
            backend._parameters.pop(name, None)
        if tags_before is None:
            tagged.pop(name, None)
        else:
            tagged[name] = tags_before
        pending = _Pending(name, parameter, tags, "Update" if existed else "Create", self.reads)
        self._pending.setdefault((backend.account_id, backend.region_name), []).append(pending)
        return parameter

    def _tick(self, backend: Any) -> None:
        """One request in the backend's account and region: validations with reads left wait, the others complete."""
        for pending in self._pending.get((backend.account_id, backend.region_name), []):
            pending.reads -= 1
        self._complete(backend, lambda p: p.reads < 0)

    def _complete(self, backend: Any, which: Any) -> None:
        key = (backend.account_id, backend.region_name)
        waiting = self._pending.get(key, [])
        done = [p for p in waiting if which(p)]
        self._pending[key] = [p for p in waiting if not which(p)]
        for pending in done:
            event = {"name": pending.name, "operation": pending.operation, "dataType": IMAGE_DATA_TYPE}
            if _image_ok(str(pending.parameter.value), backend.account_id, backend.region_name):
                backend._parameters[pending.name].append(pending.parameter)
                if pending.tags:
                    backend.add_tags_to_resource("Parameter", pending.name, pending.tags)
            else:
                event["exception"] = VALIDATION_FAILED
            self.events.append(event)


def _image_ok(value: str, account: str, region: str) -> bool:
    """The value names an image of the documented form, available in the region and visible to the account."""
    if _IMAGE_ID_RE.fullmatch(value) is None:
        return False
    for owner, backends in list(ec2_backends.items()):
        image = backends[region].amis.get(value)
        if image is None:
            continue
        visible = owner == account or any(
            p.get("UserId") == account or p.get("Group") == "all" for p in image.launch_permissions
        )
        return bool(visible and image.state == "available")
    return False
