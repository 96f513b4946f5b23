"""Batch prediction with an encoder classifier (single- or multi-label), either the bare base model or base + LoRA adapter."""

# The inference itself lives in services/common: the registry's smoke check reproduces these predictions.
from services.common.classifier_inference import (  # noqa: F401 - re-exported for the evaluator
    LABELS_FILE, check_adapter_labels, predict, predict_labels, trained_metadata, trained_pooling)
