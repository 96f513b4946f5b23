"""Source connectors: jsonl, csv, hf, pg. `open_source(parse_locator(text), roots=...)` builds one;
every connector follows the contract in `base` (stream records, describe without reading it all)."""

from services.ingest.sources.base import MAX_RAW_KEPT, Source, SourceDescription, SourceError, SourceRecord
from services.ingest.sources.locators import (
    FileLocator,
    HfLocator,
    Locator,
    LocatorError,
    PgLocator,
    open_source,
    parse_locator,
)

__all__ = [
    "MAX_RAW_KEPT", "FileLocator", "HfLocator", "Locator", "LocatorError", "PgLocator", "Source",
    "SourceDescription", "SourceError", "SourceRecord", "open_source", "parse_locator",
]
