"""schemathesis over the API's own OpenAPI document: generated requests (valid and not) to every operation, with an
admin token, must never get a 500, and every answer must match the schema the document states for its status.

Starting a rollout or a rollback is left out: a generated `aws:…` target would have the controller call AWS.
test_web_api.py covers both."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path
from typing import Any

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import positive_data_acceptance
from schemathesis.generation.case import Case

from amiforge.lifecycle.tokens import create_token
from amiforge.policy.document import default_policy
from amiforge.settings import Settings
from amiforge.store.sql import open_store
from amiforge.web.app import create_app
from amiforge.web.context import Context, Controllers
from amiforge.web.metrics import Metrics

# The registry and the app exist at import: schemathesis makes one test per operation while pytest collects.
# (Its `from_fixture` fails under pytest 9.) The folder goes when this process ends.
_TMP = Path(tempfile.mkdtemp(prefix="amiforge-schema-"))
atexit.register(shutil.rmtree, _TMP, ignore_errors=True)
_SETTINGS = Settings(data_dir=_TMP / "data", actor="schemathesis")
_STORE = open_store(f"sqlite:///{_TMP / 'registry.db'}")
for _name in ("web", "web", "api"):
    _STORE.create_version(name=_name, recipe_digest="a" * 64, recipe_path="/r.yaml", provider="local", tags={},
                          parent=None)  # fmt: skip
ADMIN = {"Authorization": f"Bearer {create_token('schemathesis', 'admin', store=_STORE, settings=_SETTINGS).secret}"}
_APP = create_app(Context(_STORE, _SETTINGS, Metrics(_STORE, default_policy()), Controllers(_STORE)))
schema = schemathesis.openapi.from_asgi("/api/v1/openapi.json", _APP, headers=ADMIN).exclude(
    path_regex=r"^/api/v1/(rollouts|rollback)$", method="POST"
)


# Reads: every check, valid data accepted included (a schema-valid read is answered, or is a 404).
reads = schema.include(method="GET").exclude(path_regex=r"/verify$")
# Operations, and verify: a schema-valid request may still be refused by the registry's own rules (a gate: 422; a
# channel the policy does not name: 400; a token name taken: 409), which no schema can state. They are held to
# every other check: no 500, every answer as its schema says, invalid data rejected.
operations = schema.exclude(method="GET", path_regex=r"^(?!.*/verify$)")


@reads.parametrize()
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_read_fails_or_answers_off_its_schema(case: Case[Any]) -> None:
    case.call_and_validate(headers=ADMIN)


@operations.parametrize()
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_operation_fails_or_answers_off_its_schema(case: Case[Any]) -> None:
    case.call_and_validate(headers=ADMIN, excluded_checks=[positive_data_acceptance])
