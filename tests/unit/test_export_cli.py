"""`tuneline export RUN --format ...`: the parser, the command it builds and how outcomes are shown."""

from __future__ import annotations

import pytest

from contracts.commands import ExportRun
from contracts.events import ExportedFormat
from services.cli.export_cmds import format_lines
from services.cli.main import parser


def test_the_parser_takes_repeated_formats_and_needs_one():
    args = parser().parse_args(["export", "run-1", "--format", "onnx-int8", "--format", "merged"])
    assert args.run == "run-1" and args.format == ["onnx-int8", "merged"]
    with pytest.raises(SystemExit):
        parser().parse_args(["export", "run-1"])


def test_the_command_refuses_an_empty_format_list():
    with pytest.raises(ValueError, match="at least 1"):
        ExportRun(run_id="run-1", formats=[])


def test_a_failed_format_shows_its_reason_code_and_a_shipped_one_its_parity():
    shipped = ExportedFormat(format="onnx-int8", status="shipped", path="onnx-int8", runtime="onnxruntime",
                             parity={"rows": 40, "labels_identical": False, "label_agreement": 0.975,
                                     "max_abs_logit_diff": 0.03, "accuracy": 0.9, "reference_accuracy": 0.925,
                                     "accuracy_drop": 0.025})
    failed = ExportedFormat(format="gguf-q4_k_m", status="failed", reason_code="export.quantization_failed",
                            message="Quantization for Q4_K is not yet implemented")
    with pytest.raises(ValueError, match="not registered"):
        ExportedFormat(format="x", status="failed", reason_code="export.no_such_code")
    lines = format_lines([shipped.model_dump(), failed.model_dump()])
    assert "97.5%" in lines[1] and "3.00e-02" in lines[1] and "+0.025" in lines[1]
    assert "[export.quantization_failed] Quantization for Q4_K" in lines[2]
