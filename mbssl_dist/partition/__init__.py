"""Offline user partitioning (DESIGN.md §4): ``python -m mbssl_dist.partition`` and the
per-rank loader ``load_partition``. See ``core`` for the methods and the directory format."""

from .core import (
    FORMAT_VERSION,
    METHODS,
    EdgeList,
    LocalPart,
    PartitionError,
    assign_edge_balanced,
    assign_metis,
    compute_assignment,
    format_balance,
    load_assignment,
    load_degrees,
    load_partition,
    partition_dataset,
    partition_stats,
    read_manifest,
    write_partition,
)

__all__ = [
    "FORMAT_VERSION", "METHODS", "EdgeList", "LocalPart", "PartitionError", "assign_edge_balanced",
    "assign_metis", "compute_assignment", "format_balance", "load_assignment", "load_degrees",
    "load_partition", "partition_dataset", "partition_stats", "read_manifest", "write_partition",
]
