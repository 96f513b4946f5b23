"""JSON Schema snapshots of every contract (D2): `python -m contracts.snapshots` writes the missing
ones and refuses to overwrite a snapshot whose schema changed: change the version instead."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from contracts.envelope import ENVELOPE_VERSION, Envelope
from contracts.registry import registered_types

SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"


def current_schemas() -> dict[str, dict]:
    """File name -> schema, for the envelope and every registered type at its current version."""
    out = {f"envelope.v{ENVELOPE_VERSION}.json": Envelope.model_json_schema()}
    for name, mt in sorted(registered_types().items()):
        schema = mt.model.model_json_schema()
        schema["x-tuneline"] = {"type": name, "kind": mt.kind, "schema_version": mt.version}
        out[f"{name}.v{mt.version}.json"] = schema
    return out


def render(schema: dict) -> str:
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def drift() -> tuple[list[str], list[str]]:
    """(missing snapshot files, snapshot files whose content no longer matches the code)."""
    missing, changed = [], []
    for fname, schema in current_schemas().items():
        path = SCHEMA_DIR / fname
        if not path.exists():
            missing.append(fname)
        elif path.read_text() != render(schema):
            changed.append(fname)
    return missing, changed


def orphans() -> list[str]:
    """Snapshot files whose type is no longer registered, or whose version is above the registered
    one: a published contract removed or rolled back (drift() only compares the current ones)."""
    current = {"envelope": ENVELOPE_VERSION} | {name: mt.version for name, mt in registered_types().items()}
    out = []
    for path in sorted(SCHEMA_DIR.glob("*.json")):
        name, _, version = path.name.removesuffix(".json").rpartition(".v")
        if name not in current or not version.isdigit() or int(version) > current[name]:
            out.append(path.name)
    return out


def write_missing() -> list[str]:
    missing, changed = drift()
    if changed:
        raise SystemExit(
            "these contracts changed without a version bump: " + ", ".join(changed)
            + "\nbump the type's version (with an upcaster from the old one) instead of editing a published schema"
        )
    SCHEMA_DIR.mkdir(exist_ok=True)
    schemas = current_schemas()
    for fname in missing:
        (SCHEMA_DIR / fname).write_text(render(schemas[fname]))
    return missing


if __name__ == "__main__":
    written = write_missing()
    print(f"wrote {len(written)} new snapshot(s)" + (": " + ", ".join(written) if written else ""))
    sys.exit(0)
