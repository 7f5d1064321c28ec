"""The service attacked by a tool we did not write: schemathesis generates requests for every
operation of the service's own OpenAPI document (/openapi.json) — valid ones and, in negative
mode, ones that break the schema — and sends them to the real ``moodstream serve`` process
with auth on, once with credentials (an API key holding every scope) and once without.

Every answer must pass schemathesis' checks: no 5xx, the status, content type, headers and body
as documented, schema-breaking requests refused with a 4xx, and no operation that declares
credentials serving a request without them (``ignored_auth`` sends its own probes without
and with made-up credentials). Our own check on top: every error is an
``application/problem+json`` with its ``reason``. Without credentials every protected
operation must answer 401.

Not run: ``positive_data_acceptance``. The catalog's filters carry rules OpenAPI cannot state
(``valence=low,high`` needs low <= high), so schema-valid requests may rightly get 400.

Bounded and repeatable: a fixed number of examples per operation, derandomized (the same
requests every run), no example database.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from identity import IdentityProvider, api_key
from schemathesis import checks
from schemathesis.config import SchemathesisConfig
from serving import ServiceProcess

from pipeline.service.auth import SCOPES

pytestmark = pytest.mark.integration

MAX_EXAMPLES = 40
SEED = 39
PROBLEM = "application/problem+json"


@schemathesis.check
def errors_are_problem_documents(ctx: Any, response: Any, case: Any) -> bool | None:
    """Every 4xx/5xx is a problem document (RFC 9457) whose type names its reason."""
    if response.status_code < 400 or case.path == "/readyz":  # readyz's 503 is a probe answer
        return None
    content_type = response.headers.get("content-type", [""])
    content_type = content_type[0] if isinstance(content_type, list) else content_type
    assert content_type == PROBLEM, f"{response.status_code} answered as {content_type!r}, not {PROBLEM}"
    body = response.json()
    assert body["status"] == response.status_code, body
    assert body["reason"] and body["type"] == f"urn:moodstream:problem:{body['reason']}", body
    assert body["title"] and isinstance(body["detail"], str), body
    return True


CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_headers_conformance,
    checks.response_schema_conformance,
    checks.negative_data_rejection,
    checks.ignored_auth,
    checks.unsupported_method,
    checks.allow_header_conformance,
    checks.missing_required_header,
    errors_are_problem_documents,
]


@pytest.fixture(scope="module")
def idp(tmp_path_factory) -> IdentityProvider:
    return IdentityProvider(tmp_path_factory.mktemp("idp"))


@pytest.fixture(scope="module")
def key() -> tuple[str, str]:
    return api_key("schemathesis", "moods:read moods:analyse moods:admin")


@pytest.fixture(scope="module")
def service(tmp_path_factory, idp, key) -> Iterator[ServiceProcess]:
    try:
        with ServiceProcess(
            tmp_path_factory.mktemp("schemathesis"),
            **idp.settings(),
            MOODSTREAM_AUTH_API_KEYS=key[1],
            # Generated uploads are small; a bound this low keeps any that sniff as audio cheap.
            MOODSTREAM_MAX_UPLOAD_BYTES="65536",
            MOODSTREAM_ANALYSIS_TIMEOUT_S="30",
        ) as running:
            yield running
    except RuntimeError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="module")
def api_schema(service, idp, key) -> Any:
    """The running service's document, with credentials for both of its security schemes (a
    token holding every scope, valid for the run, and an API key)."""
    config = SchemathesisConfig.from_dict(
        {
            "seed": SEED,
            "auth": {
                "openapi": {
                    "bearer": {"bearer": idp.token(scope=" ".join(SCOPES), sub="schemathesis", exp_in_s=3600)},
                    "apiKey": {"api_key": key[0]},
                }
            },
        }
    )
    return schemathesis.openapi.from_url(service.url + "/openapi.json", config=config)


schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.fixture(autouse=True)
def _node_id_for_schemathesis(request) -> None:
    """schemathesis 4.32's lazy schemas read and rename ``request.node._nodeid``, which pytest 9.2
    no longer has (it keeps the id elsewhere): give the node one to read."""
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_every_operation_with_and_without_credentials(case, service):
    case.call_and_validate(checks=CHECKS)
    # The same operation asked with no credentials at all: refused before anything is read.
    bare = requests.request(case.method, service.url + case.formatted_path, params=case.query, timeout=60)
    protected = bool(case.operation.definition.raw.get("security"))
    if bare.status_code >= 400:
        assert bare.headers["content-type"] == PROBLEM, bare.headers
    # Schemathesis also tries methods a route lacks (405) and paths no route matches, such as a
    # track id with a line break (Starlette's 404 "Not Found", before any route runs).
    if bare.status_code == 405 or (bare.status_code == 404 and bare.json()["detail"] == "Not Found"):
        return
    assert (bare.status_code == 401) == protected, (case.method, case.formatted_path, bare.status_code, bare.text)
