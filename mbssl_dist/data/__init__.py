"""Data layer: importers (text, table, synthetic), validation split, prepared directory."""

from .dataset import PreparedDataset, load_prepared, write_prepared
from .errors import DataError

__all__ = ["PreparedDataset", "load_prepared", "write_prepared", "DataError"]
