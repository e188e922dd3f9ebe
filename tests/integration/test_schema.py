"""Property-based run of the whole HTTP API against its own /openapi.json (schemathesis):
valid tokens, generated parameters; no 5xx and no answer outside the documented schema."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.support.config import ADMIN_TOKEN, API_TOKEN
from tests.support.harness import serve, service_env


@pytest.fixture(scope="module")
def api_process(
    migrated: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    log = tmp_path_factory.mktemp("schema") / "serve.log"
    with serve(service_env(migrated, redis_url), log) as url:
        yield url
    # Any traceback in the server's log is a defect even when the answer looked fine.
    assert "Traceback" not in log.read_text(), log.read_text()[-4000:]


def test_api_conforms_to_its_schema(api_process: str) -> None:
    schema = schemathesis.openapi.from_url(f"{api_process}/openapi.json")
    checked = 0
    for result in schema.get_all_operations():
        operation = result.ok()  # type: ignore[union-attr]  # an invalid schema raises here
        if operation.path.endswith("/stream"):
            continue  # an endless event stream; tests/integration/test_api.py covers it
        admin = (
            operation.path.startswith("/v1/deliveries")
            or operation.path.endswith("/refresh")
            or operation.method.upper() == "DELETE"
        )
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN if admin else API_TOKEN}"}

        @given(case=operation.as_strategy())
        @settings(
            max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        def check(case: schemathesis.Case) -> None:  # type: ignore[type-arg]
            # A cursor's validity cannot be written in a schema (it is opaque), so a made-up one
            # is rightly refused with 400; every other check runs.
            case.call_and_validate(
                headers=headers,  # noqa: B023 (called right here)
                excluded_checks=[positive_data_acceptance],
            )

        check()
        checked += 1
    assert checked >= 10
