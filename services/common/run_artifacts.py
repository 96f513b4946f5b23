"""A run's artifacts, found in its events: every ArtifactRef an event of the run carries (`uri`,
`sha256`, `size`, at any depth of its payload), named by the event type and the field that holds it
(`prep.prepared.train`, `training.completed.adapter`), so a field added to an event later shows up
without a change here. Used by `tuneline artifacts`, lineage, gate replay and the support bundle."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

from contracts.common import ArtifactRef
from services.common.artifacts import ArtifactIntegrityError, ArtifactStore


@dataclass
class NamedArtifact:
    name: str
    ref: ArtifactRef
    also: list[str] = field(default_factory=list)  # other events' fields that name the same artifact


def _refs(value, path: tuple[str, ...] = ()):
    """(field path, ArtifactRef) for every ArtifactRef-shaped dict in a payload, depth first."""
    if isinstance(value, dict):
        if isinstance(value.get("uri"), str) and isinstance(value.get("sha256"), str) and "size" in value:
            try:
                yield path, ArtifactRef(uri=value["uri"], sha256=value["sha256"], size=value["size"])
                return
            except ValueError:
                pass
        for key, item in value.items():
            yield from _refs(item, path + (str(key),))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _refs(item, path + (str(i),))


def run_artifacts(events: list[dict]) -> list[NamedArtifact]:
    """The artifacts a run's events (in order, as `tuneline events --json` gives them) refer to."""
    by_sha: dict[str, NamedArtifact] = {}
    for event in events:
        payload = event["payload"]
        for path, ref in _refs(payload):
            if path[:1] == ("plan",):
                continue  # the plan restates what started the run, never an output of it
            name = ".".join((event["type"], *path))
            if ref.sha256 in by_sha:
                by_sha[ref.sha256].also.append(name)
            else:
                by_sha[ref.sha256] = NamedArtifact(name, ref)
    return list(by_sha.values())


def store_of(ref: ArtifactRef) -> ArtifactStore:
    """The file store holding `ref` (its objects live at <root>/objects/<sha[:2]>/<sha>)."""
    parsed = urlparse(ref.uri)
    if parsed.scheme != "file":
        raise ArtifactIntegrityError(f"{ref.uri}: only file:// artifacts can be copied out")
    return ArtifactStore(Path(unquote(parsed.path)).parents[2])
