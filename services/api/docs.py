"""The API's published contracts, generated from the code and committed (D18): docs/openapi.json from the
FastAPI app, docs/asyncapi.json from the registered message types and their subjects. `python -m
services.api.docs` (`make api-docs`) rewrites both; tests/contract/test_api_docs.py fails when they drift."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from contracts import subjects
from contracts.envelope import Envelope
from contracts.registry import registered_types

DOCS = Path(__file__).resolve().parents[2] / "docs"
OPENAPI = DOCS / "openapi.json"
ASYNCAPI = DOCS / "asyncapi.json"
REF = "#/components/schemas/{model}"


def openapi() -> dict:
    from services.api.app import create_app

    return create_app(connect=False).openapi()


def _hoist(schema: dict, into: dict) -> dict:
    for name, sub in (schema.pop("$defs", None) or {}).items():
        into.setdefault(name, sub)
    return schema


def _address(name: str, kind: str) -> tuple[str, dict]:
    """The subject a type travels on, as an AsyncAPI address with its parameters."""
    if kind == "command":
        return subjects.subject_for(name, kind="command"), {}
    if name.startswith("registry.") or name == subjects.TEST_SET_FROZEN:
        address = subjects.subject_for(name, kind="event", target="TARGET").replace("TARGET", "{target}")
        return address, {"target": {"description": "the deployment target ([A-Za-z0-9_-]+)"}}
    return subjects.subject_for(name, kind="event"), {}


def asyncapi() -> dict:
    schemas: dict = {}
    envelope = _hoist(Envelope.model_json_schema(ref_template=REF), schemas)
    schemas["Envelope"] = envelope
    channels, operations, messages = {}, {}, {}
    for name, mt in sorted(registered_types().items()):
        model = mt.model.__name__
        schemas[model] = _hoist(mt.model.model_json_schema(ref_template=REF), schemas)
        key = name.replace(".", "_")
        messages[key] = {
            "name": name, "title": f"{name} v{mt.version}", "summary": (mt.model.__doc__ or "").strip().split("\n")[0],
            "contentType": "application/json",
            "headers": {"type": "object", "properties": {"Nats-Msg-Id": {"type": "string", "format": "uuid",
                                                                         "description": "the envelope's event_id"}}},
            "payload": {"allOf": [{"$ref": "#/components/schemas/Envelope"},
                                  {"type": "object", "properties": {
                                      "type": {"const": name}, "schema_version": {"const": mt.version},
                                      "payload": {"$ref": f"#/components/schemas/{model}"}}}]},
        }
        address, params = _address(name, mt.kind)
        channel = {"address": address, "messages": {key: {"$ref": f"#/components/messages/{key}"}},
                   "description": f"{mt.kind} {name}, stream {subjects.STREAM}"}
        if params:
            channel["parameters"] = params
        channels[key] = channel
        operations[f"{'send' if mt.kind == 'event' else 'receive'}_{key}"] = {
            "action": "send" if mt.kind == "event" else "receive",
            "channel": {"$ref": f"#/channels/{key}"},
            "summary": ("a Tuneline service publishes it" if mt.kind == "event"
                        else "a Tuneline service acts on it (the CLI and the API publish it)"),
            "messages": [{"$ref": f"#/channels/{key}/messages/{key}"}],
        }
    channels["dead_letters"] = {"address": subjects.DLQ + ".{consumer}",
                                "parameters": {"consumer": {"description": "the durable consumer that gave up"}},
                                "description": f"messages a consumer could not take, stream {subjects.DLQ_STREAM} (D4)"}
    return {
        "asyncapi": "3.0.0",
        "info": {"title": "Tuneline events and commands", "version": "1",
                 "description": "Every message is one envelope (D2) on JetStream stream "
                                f"{subjects.STREAM} ({', '.join(subjects.STREAM_SUBJECTS)}); generated from "
                                "contracts.registry.registered_types() and contracts.subjects."},
        "defaultContentType": "application/json",
        "servers": {"local": {"host": "127.0.0.1:4222", "protocol": "nats",
                              "description": "the nats-server `tuneline up` starts (JetStream)"}},
        "channels": channels, "operations": operations,
        "components": {"messages": messages, "schemas": dict(sorted(schemas.items()))},
    }


def render(doc: dict) -> str:
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def main() -> None:
    DOCS.mkdir(exist_ok=True)
    for path, doc in ((OPENAPI, openapi()), (ASYNCAPI, asyncapi())):
        path.write_text(render(doc))
        print(f"wrote {path.relative_to(DOCS.parent)}", file=sys.stderr)


if __name__ == "__main__":
    main()
