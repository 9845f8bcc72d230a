"""Offline user partitioning (DESIGN.md §4): ``python -m mbssl_dist.partition`` and the
readers of its directory format. See ``core`` for the methods and the format; what a rank
loads at run time (``LocalPart``, ``load_partition``) is ``parallel.part``."""

from .core import (
    FORMAT_VERSION,
    METHODS,
    EdgeList,
    PartitionError,
    assign_edge_balanced,
    assign_metis,
    compute_assignment,
    format_balance,
    load_assignment,
    load_degrees,
    partition_dataset,
    partition_stats,
    read_manifest,
    write_partition,
)

__all__ = [
    "FORMAT_VERSION", "METHODS", "EdgeList", "PartitionError", "assign_edge_balanced", "assign_metis",
    "compute_assignment", "format_balance", "load_assignment", "load_degrees", "partition_dataset",
    "partition_stats", "read_manifest", "write_partition",
]
