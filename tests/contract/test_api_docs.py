"""docs/openapi.json and docs/asyncapi.json are what the code generates (D18): a change to the API or to a
registered contract without `make api-docs` fails here."""

from __future__ import annotations

import json

import pytest

from contracts.registry import registered_types
from services.api import docs


@pytest.mark.parametrize("path,generate", [(docs.OPENAPI, docs.openapi), (docs.ASYNCAPI, docs.asyncapi)],
                         ids=["openapi", "asyncapi"])
def test_committed_api_docs_match_the_code(path, generate):
    assert path.exists(), f"{path.name} is missing: run `make api-docs`"
    assert path.read_text() == docs.render(generate()), f"{path.name} drifted from the code: run `make api-docs`"


def test_asyncapi_has_a_channel_and_message_for_every_registered_type():
    doc = json.loads(docs.ASYNCAPI.read_text())
    for name, mt in registered_types().items():
        key = name.replace(".", "_")
        assert key in doc["components"]["messages"], name
        address = doc["channels"][key]["address"]
        assert address.startswith("tuneline.cmd." if mt.kind == "command" else "tuneline.evt."), address
    assert doc["channels"]["registry_promoted"]["address"] == "tuneline.evt.registry.{target}.promoted"


def test_every_api_action_requires_a_bearer_token_in_openapi():
    doc = json.loads(docs.OPENAPI.read_text())
    assert "HTTPBearer" in doc["components"]["securitySchemes"]
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            if path != "/api/health":
                assert op.get("security"), f"{method.upper()} {path} documents no token"
