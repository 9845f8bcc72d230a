"""``python -m mbssl_dist.data prepare --format {text,table,synthetic} --input ... --out DIR``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .errors import DataError


def _names(s: str | None) -> list[str] | None:
    if s is None:
        return None
    names = [x.strip() for x in s.split(",")]
    if any(not x for x in names):
        raise DataError(f"--behaviors {s!r}: empty name; expected e.g. view,cart,buy", field="behaviors")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mbssl_dist.data", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("prepare", help="write a canonical prepared dataset directory")
    pr.add_argument("--format", required=True, choices=["text", "table", "synthetic"])
    pr.add_argument("--input", type=Path, help="text: directory of <behavior>.txt[.gz] + test.txt[.gz]; "
                                                 "table: CSV/Parquet file")
    pr.add_argument("--out", type=Path, required=True)
    pr.add_argument("--behaviors", help="comma-separated, weakest first, target last (default: "
                                        "view/pv/click < fav < cart < buy)")
    pr.add_argument("--target", help="target behavior name (default: last of --behaviors)")
    pr.add_argument("--n-users", type=int, help="text: declared number of users (default: max id + 1)")
    pr.add_argument("--n-items", type=int, help="text: declared number of items (default: max id + 1)")
    pr.add_argument("--seed", type=int, default=0, help="seed of the validation split (and synthetic data)")
    pr.add_argument("--valid", default="one-per-user", choices=["one-per-user", "none"])
    pr.add_argument("--on-test-in-train", default="error", choices=["error", "drop"])
    pr.add_argument("--valid-aux", default="auto", choices=["auto", "keep", "drop"],
                    help="auxiliary interactions on validation pairs: keep, drop, or auto = mirror how the test "
                         "split was built (drop all when no test pair occurs in an auxiliary behavior; drop on "
                         "a seeded subset when validation is far more often in one than the test)")
    pr.add_argument("--overwrite", action="store_true")
    for name, typ, default in [("users", int, 600), ("items", int, 400), ("clusters", int, 8)]:
        pr.add_argument(f"--synthetic-{name}", type=typ, default=default)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    from . import prepare as P

    try:
        if args.format == "synthetic":
            from .synthetic import SyntheticSpec
            spec = SyntheticSpec(n_users=args.synthetic_users, n_items=args.synthetic_items,
                                 n_clusters=args.synthetic_clusters, seed=args.seed)
            if args.behaviors:
                spec.behaviors = _names(args.behaviors)
                spec.aux_extra = [float(len(spec.behaviors) - 1 - k) for k in range(len(spec.behaviors) - 1)]
            try:
                spec.validate()
            except ValueError as e:
                raise DataError(str(e)) from None
            P.prepare_synthetic(args.out, spec, valid=args.valid, valid_aux=args.valid_aux, overwrite=args.overwrite)
        else:
            if args.input is None:
                raise DataError(f"--input is required for --format {args.format}", field="input")
            common = dict(behaviors=_names(args.behaviors), target=args.target, seed=args.seed, valid=args.valid,
                          on_test_in_train=args.on_test_in_train, valid_aux=args.valid_aux, overwrite=args.overwrite)
            if args.format == "text":
                P.prepare_text(args.input, args.out, n_users=args.n_users, n_items=args.n_items, **common)
            else:
                P.prepare_table(args.input, args.out, **common)
    except (DataError, FileExistsError) as e:
        logging.getLogger("mbssl_dist.data").error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
