"""``python -m mbssl_dist.partition --data PREPARED_DIR --parts P --method M --out DIR``.

Assigns users to P parts (items are replicated on every rank) and writes a partition
directory atomically; see ``mbssl_dist.partition.core`` for methods and format.
Exit codes: 0 ok, 2 bad input (nothing written).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .core import DEFAULT_USER_SLACK, METHODS, PartitionError, format_balance, partition_dataset

log = logging.getLogger("mbssl_dist.partition")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mbssl_dist.partition", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="prepared dataset directory")
    p.add_argument("--parts", type=int, required=True, help="number of parts P (>= 1, <= n_users)")
    p.add_argument("--method", required=True, choices=METHODS,
                   help="edge-balanced: greedy LPT on user degree; range: contiguous id ranges balanced "
                        "on degree; metis: pymetis on the bipartite "
                        "user+item graph; dgl: dgl.distributed.partition_graph (needs .venv-dgl)")
    p.add_argument("--out", type=Path, required=True, help="output partition directory")
    p.add_argument("--seed", type=int, default=0, help="METIS / DGL seed (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--user-slack", type=float, default=DEFAULT_USER_SLACK,
                   help="edge-balanced: a part holds at most ceil((1+slack)*n_users/P) users")
    p.add_argument("--dgl-part-method", choices=["metis", "random"], default="metis",
                   help="dgl: part_method passed to partition_graph")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    from ..data.errors import DataError

    opts = {}
    if args.method == "edge-balanced":
        opts["user_slack"] = args.user_slack
    if args.method == "dgl":
        opts["dgl_part_method"] = args.dgl_part_method
    try:
        m = partition_dataset(args.data, args.out, args.parts, method=args.method, seed=args.seed,
                              overwrite=args.overwrite, **opts)
    except (DataError, PartitionError, FileExistsError) as e:
        log.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        return 2
    log.info("wrote %s in %.2f s\n%s", args.out, m["elapsed_seconds"], format_balance(m))
    return 0


if __name__ == "__main__":
    sys.exit(main())
