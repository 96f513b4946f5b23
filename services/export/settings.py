"""Export settings (env prefix TUNELINE_EXPORT_)."""

from pathlib import Path

from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings


class ExportSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="TUNELINE_EXPORT_", extra="ignore", frozen=True)

    # the formats every run is exported in (services/export/formats.py); empty: the model shape's formats
    formats: tuple[str, ...] = ()
    # test rows each format's parity check runs on
    smoke_rows: int = 256
    # a quantised format (onnx-int8, gguf-q8_0) fails its smoke check when its accuracy on the test rows
    # drops by more than this against the trained model
    max_quantized_accuracy_drop: float = 0.05
    # where an export is assembled before it goes into the artifact store (None: the system's temp folder)
    work_dir: Path | None = None
