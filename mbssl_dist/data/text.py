"""Importer for the per-behavior text format of the MBSSL/GHCF data.

A directory holds ``<behavior>.txt[.gz]`` files (``uid item item ...`` per line, 0-based
integer ids) and ``test.txt[.gz]`` (``uid item`` per line). Every problem raises
``DataError`` naming the file and line.
"""

from __future__ import annotations

import gzip
import logging
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError

log = logging.getLogger(__name__)

# Default order of behaviors: weakest signal first, target last.
BEHAVIOR_RANK = {"view": 0, "pv": 0, "click": 0, "fav": 1, "collect": 1, "cart": 2, "buy": 3, "train": 3}
RESERVED = {"test", "valid", "validation"}
MAX_ID = 2**31 - 2  # n = max id + 1 must fit the prepared directory's int32 columns
_INT = re.compile(r"-?[0-9]+")
_NAME = re.compile(r"^(?P<name>[A-Za-z][A-Za-z0-9_-]*)\.txt(?:\.gz)?$")


@dataclass
class TextData:
    behaviors: list[str]
    users: list[np.ndarray]  # per behavior
    items: list[np.ndarray]
    test_user: np.ndarray
    test_item: np.ndarray
    files: dict[str, Path]
    n_users: int
    n_items: int
    order: dict | None = None  # behavior order, target and how it was chosen (manifest "behavior_order")


def _open(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    return open(path, "rb")


def _read_lines(path: Path):
    """Yield (line_number, stripped_line); turns I/O, gzip and encoding problems into DataError.

    Lines end at ``\n`` only (``\r\n`` is fine: the ``\r`` is stripped). A ``\r`` inside a line
    means CR-only line endings, which would otherwise merge every line into one.
    """
    lineno = 0
    try:
        with _open(path) as f:
            for lineno, raw in enumerate(f, 1):
                if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):  # BOM (Windows editors): not part of an id
                    raw = raw[3:]
                try:
                    line = raw.decode("utf-8").strip()
                except UnicodeDecodeError as e:
                    raise DataError(f"bytes that are not UTF-8 ({raw[e.start:e.start + 4]!r})", file=str(path),
                                    line=lineno) from None
                if "\r" in line:
                    raise DataError("carriage return inside a line: CR-only (old Mac) line endings are not "
                                    "supported; convert them to \\n (e.g. tr '\\r' '\\n')", file=str(path),
                                    line=lineno)
                yield lineno, line
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read file ({type(e).__name__}: {e})", file=str(path)) from e


def _parse_id(tok: str, path: Path, lineno: int, what: str, limit: int | None) -> int:
    # int() alone would accept "1_000", "+5" and non-ASCII digits; ids are plain decimal numbers
    if not _INT.fullmatch(tok):
        raise DataError(f"{what} id {tok!r} is not an integer", file=str(path), line=lineno)
    v = int(tok)
    if v > MAX_ID:
        raise DataError(f"{what} id {tok} is too large (ids are stored as int32: at most {MAX_ID})", file=str(path),
                        line=lineno)
    if v < 0:
        raise DataError(f"{what} id {v} is negative", file=str(path), line=lineno)
    if limit is not None and v >= limit:
        raise DataError(f"{what} id {v} is out of range: declared n_{what}s = {limit}", file=str(path), line=lineno)
    return v


def read_behavior_file(path: Path, n_users: int | None, n_items: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Parse ``uid item item ...`` lines. A user may appear on one line only; an item at
    most once per line (the format has no multiplicities)."""
    users: list[int] = []
    items: list[int] = []
    seen_users: dict[int, int] = {}
    for lineno, line in _read_lines(path):
        if not line:
            continue
        toks = line.split()
        u = _parse_id(toks[0], path, lineno, "user", n_users)
        if u in seen_users:
            raise DataError(f"user {u} already has a line (line {seen_users[u]}); one line per user expected",
                            file=str(path), line=lineno)
        seen_users[u] = lineno
        row = [_parse_id(t, path, lineno, "item", n_items) for t in toks[1:]]
        if len(set(row)) != len(row):
            dup = next(x for x in row if row.count(x) > 1)
            raise DataError(f"item {dup} is listed twice for user {u}", file=str(path), line=lineno)
        users.extend([u] * len(row))
        items.extend(row)
    if not items:
        raise DataError("behavior file has no interactions", file=str(path))
    return np.asarray(users, dtype=np.int64), np.asarray(items, dtype=np.int64)


def read_test_file(path: Path, n_users: int | None, n_items: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Parse ``uid item`` lines: exactly one held-out item per test user."""
    users, items = [], []
    seen: dict[int, int] = {}
    for lineno, line in _read_lines(path):
        if not line:
            continue
        toks = line.split()
        if len(toks) != 2:
            raise DataError(f"expected 'uid item' (2 fields), got {len(toks)} field(s)", file=str(path), line=lineno)
        u = _parse_id(toks[0], path, lineno, "user", n_users)
        i = _parse_id(toks[1], path, lineno, "item", n_items)
        if u in seen:
            raise DataError(f"duplicate test entry for user {u} (first at line {seen[u]})", file=str(path), line=lineno)
        seen[u] = lineno
        users.append(u)
        items.append(i)
    if not users:
        raise DataError("test file is empty", file=str(path))
    return np.asarray(users, dtype=np.int64), np.asarray(items, dtype=np.int64)


def discover(input_dir: Path) -> dict[str, Path]:
    """Map behavior/test name -> file; ``x.txt`` and ``x.txt.gz`` both present is an error."""
    if input_dir.is_file():
        raise DataError("is a file; --format text reads a directory of <behavior>.txt[.gz] files plus test.txt "
                        "(a CSV or Parquet table is --format table)", file=str(input_dir))
    if not input_dir.is_dir():
        raise DataError("input directory does not exist", file=str(input_dir))
    found: dict[str, Path] = {}
    for p in sorted(input_dir.iterdir()):
        m = _NAME.match(p.name)
        if not m or not p.is_file():
            continue
        name = m.group("name")
        if name.isupper():  # README.txt, INCOMPLETE.txt, LICENSE.txt: documentation, not data
            log.info("skipping documentation file %s", p)
            continue
        if name in found:
            raise DataError(f"both {found[name].name} and {p.name} present; keep one", file=str(input_dir))
        found[name] = p
    return found


def report_order(behaviors: list[str], *, by_behaviors: bool, by_target: bool, where: str) -> dict:
    """Log the behavior order and target, warn when the target is not ``buy`` or was inferred
    from whichever behaviors happen to be present; return the manifest's ``behavior_order``."""
    tgt = behaviors[-1]
    how = ("last of --behaviors" if by_behaviors else "--target" if by_target else
           "inferred: the strongest behavior present (default order view/pv/click < fav/collect < cart < buy/train)")
    warnings = []
    if tgt != "buy":
        w = f"{where}: target behavior is {tgt!r}, not the conventional 'buy'"
        if not (by_behaviors or by_target):
            w += (f"; it was inferred from the behaviors present ({behaviors}), so a missing buy file silently "
                  f"changes the task: pass --target {tgt} (data.target) to confirm")
        warnings.append(w)
    log.info("behavior order %s (weakest first), target %r (%s)", behaviors, tgt, how)
    for w in warnings:
        log.warning("%s", w)
    return {"behaviors": list(behaviors), "target": tgt, "chosen_by": how, "warnings": warnings}


def default_order(names: list[str]) -> list[str]:
    unknown = [n for n in names if n not in BEHAVIOR_RANK]
    if unknown:
        raise DataError(f"cannot order unknown behavior(s) {unknown} automatically; pass --behaviors "
                        f"explicitly (weakest first, target last), known: {sorted(BEHAVIOR_RANK)}")
    return sorted(names, key=lambda n: (BEHAVIOR_RANK[n], n))


def read_text_dir(input_dir: Path, behaviors: list[str] | None = None, target: str | None = None,
                  n_users: int | None = None, n_items: int | None = None) -> TextData:
    """Read a whole text dataset directory (behavior files + test file)."""
    explicit = behaviors
    for what, v in (("n_users", n_users), ("n_items", n_items)):
        if v is not None and v < 1:
            raise DataError(f"--{what.replace('_', '-')} {v}: must be >= 1 (omit it to use max id + 1)",
                            field=what)
    files = discover(input_dir)
    if "test" not in files:
        raise DataError("no test.txt or test.txt.gz found", file=str(input_dir))
    available = [n for n in files if n not in RESERVED]
    if behaviors is None:
        try:
            behaviors = default_order(available)
        except DataError as e:
            raise DataError(e.problem, file=str(input_dir)) from None
        if target is not None:
            if target not in behaviors:
                raise DataError(f"target behavior {target!r} has no file; found {available}", file=str(input_dir))
            behaviors = [b for b in behaviors if b != target] + [target]
    else:
        dups = {b for b in behaviors if behaviors.count(b) > 1}
        if dups:
            raise DataError(f"duplicate behavior name(s) {sorted(dups)} in --behaviors", field="behaviors")
        for b in behaviors:
            if b in RESERVED:
                raise DataError(f"{b!r} is reserved for held-out data, not a behavior", field="behaviors")
            if b not in files:
                raise DataError(f"unknown behavior {b!r}: no {b}.txt[.gz] in the directory; found {available}",
                                file=str(input_dir), field="behaviors")
        if target is not None and behaviors[-1] != target:
            raise DataError(f"target behavior {target!r} must be last in --behaviors {behaviors}", field="behaviors")
    if not behaviors:
        raise DataError("no behavior files found (expected <behavior>.txt[.gz])", file=str(input_dir))
    by_behaviors, by_target = explicit is not None, target is not None
    order = report_order(behaviors, by_behaviors=by_behaviors, by_target=by_target, where=str(input_dir))
    us, its = [], []
    for b in behaviors:
        u, i = read_behavior_file(files[b], n_users, n_items)
        us.append(u)
        its.append(i)
        log.info("read %s: %d interactions, %d users", files[b].name, len(u), len(np.unique(u)))
    tu, ti = read_test_file(files["test"], n_users, n_items)
    ignored = [n for n in available if n not in behaviors]
    if ignored:
        log.warning("ignoring behavior file(s) not listed in --behaviors: %s", ignored)
    inferred_u = int(max(max(int(u.max()) for u in us), int(tu.max()))) + 1
    inferred_i = int(max(max(int(i.max()) for i in its), int(ti.max()))) + 1
    return TextData(behaviors, us, its, tu, ti, {b: files[b] for b in behaviors} | {"test": files["test"]},
                    n_users if n_users is not None else inferred_u,
                    n_items if n_items is not None else inferred_i, order)
