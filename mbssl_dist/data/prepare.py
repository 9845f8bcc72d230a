"""Build a canonical prepared dataset directory from any importer's output.

Checks shared by all importers live here (empty dataset, test users without training data,
test pairs also in training), then the validation split, then an atomic write.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa

from ..utils.io import atomic_dir, sha256_file
from .dataset import MANIFEST, PreparedDataset, write_prepared
from .errors import DataError
from .split import carve_validation, pair_keys

log = logging.getLogger(__name__)
OnTestInTrain = Literal["error", "drop"]


def mirror_count(valid_in_aux: int, n_valid: int, test_in_aux: int, n_test: int) -> int:
    """How many validation pairs ``valid_aux = "auto"`` strips of their auxiliary interactions.

    A test where no pair occurs in an auxiliary behavior was built that way (Retailrocket,
    IJCAI): strip them all. Otherwise strip just enough that the validation's share of pairs
    found in an auxiliary behavior equals the test's, but only when the validation's share
    is higher by more than 3 standard errors of the difference (a two-proportion z-test):
    both are samples, and a difference within sampling noise is no evidence the test was
    built differently, so such data stays exactly as it is.
    """
    if n_valid == 0 or n_test == 0 or valid_in_aux == 0:
        return 0
    if test_in_aux == 0:
        return valid_in_aux
    p_v, p_t = valid_in_aux / n_valid, test_in_aux / n_test
    pooled = (valid_in_aux + test_in_aux) / (n_valid + n_test)
    se = math.sqrt(pooled * (1.0 - pooled) * (1.0 / n_valid + 1.0 / n_test))
    if p_v - p_t <= 3.0 * se:
        return 0
    return max(0, valid_in_aux - round(p_t * n_valid))


def assemble(behaviors: list[str], users: list[np.ndarray], items: list[np.ndarray],
             test_user: np.ndarray, test_item: np.ndarray, n_users: int, n_items: int,
             *, seed: int = 0, valid: str = "one-per-user", on_test_in_train: OnTestInTrain = "error",
             valid_aux: str = "auto", target_timestamps: np.ndarray | None = None, test_file: str = "<test>",
             manifest: dict | None = None) -> PreparedDataset:
    """Validate and split into train / valid / test; returns an in-memory dataset."""
    if valid not in ("one-per-user", "none"):
        raise DataError(f"valid must be 'one-per-user' or 'none', got {valid!r}", field="valid")
    if valid_aux not in ("auto", "keep", "drop"):
        raise DataError(f"valid_aux must be 'auto', 'keep' or 'drop', got {valid_aux!r}", field="valid_aux")
    total = sum(len(u) for u in users)
    if total == 0 or n_users == 0 or n_items == 0:
        raise DataError("empty dataset: no training interactions")
    for b, u in zip(behaviors, users):
        if len(u) == 0:
            raise DataError(f"behavior {b!r} has no interactions", field=b)
    K = len(behaviors)
    manifest = dict(manifest or {})
    dropped: dict[str, int] = {}

    # Test users must have some training data.
    has_train = np.zeros(n_users, dtype=bool)
    for u in users:
        has_train[u] = True
    no_train = test_user[~has_train[test_user]]
    if len(no_train):
        raise DataError(f"{len(no_train)} test user(s) have no training interactions (first: user "
                        f"{int(no_train[0])})", file=test_file)
    # Test pairs must not be in the target training set.
    tk = pair_keys(users[-1], items[-1], n_items)
    test_keys = pair_keys(test_user, test_item, n_items)
    clash = np.isin(test_keys, tk)
    if clash.any():
        first = int(np.flatnonzero(clash)[0])
        msg = (f"{int(clash.sum())} test pair(s) also occur in the training target behavior "
               f"{behaviors[-1]!r} (first: user {int(test_user[first])}, item {int(test_item[first])})")
        if on_test_in_train == "error":
            raise DataError(msg + "; pass --on-test-in-train drop to remove them from training", file=test_file)
        drop = np.isin(tk, test_keys)
        log.warning("%s; dropping %d training pair(s)", msg, int(drop.sum()))
        users[-1], items[-1] = users[-1][~drop], items[-1][~drop]
        if target_timestamps is not None:
            target_timestamps = target_timestamps[~drop]
        dropped["test_pairs_removed_from_train"] = int(drop.sum())

    counts_input = {b: int(len(u)) for b, u in zip(behaviors, users)}
    if valid == "one-per-user":
        keep, vidx = carve_validation(users[-1], items[-1], seed, target_timestamps)
        valid_user, valid_item = users[-1][vidx], items[-1][vidx]
        users[-1], items[-1] = users[-1][keep], items[-1][keep]
    else:
        valid_user = valid_item = np.zeros(0, dtype=np.int64)

    # The validation pair must look like the test pair. Some splits (Retailrocket) removed
    # every auxiliary interaction on the test pair; others (pv-less Beibei) did so on some:
    # a validation pair still present in carts would be far easier than the test. ``auto``
    # mirrors what the test shows (see ``mirror_count``).
    aux_keys = [pair_keys(users[k], items[k], n_items) for k in range(K - 1)]

    def membership(keys: np.ndarray) -> tuple[int, np.ndarray]:
        """(pairs counted once per auxiliary behavior they occur in, per pair: in any of them)."""
        hits = [np.isin(keys, a) for a in aux_keys]
        return sum(int(h.sum()) for h in hits), (np.logical_or.reduce(hits) if hits
                                                  else np.zeros(len(keys), dtype=bool))

    test_in_aux, test_any = membership(test_keys)
    vkeys = pair_keys(valid_user, valid_item, n_items)
    in_any_aux = membership(vkeys)[1]
    if valid_aux == "keep" or len(vkeys) == 0:
        n_strip = 0
    elif valid_aux == "drop":
        n_strip = int(in_any_aux.sum())
    else:
        n_strip = mirror_count(int(in_any_aux.sum()), len(vkeys), int(test_any.sum()), len(test_keys))
    strip = np.zeros(len(vkeys), dtype=bool)
    if n_strip:
        cand = np.flatnonzero(in_any_aux)
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0xA0C5]))
        strip[np.sort(rng.choice(cand, size=n_strip, replace=False))] = True
    valid_aux_removed = 0
    if n_strip:
        skeys = vkeys[strip]
        for k in range(K - 1):
            m = np.isin(aux_keys[k], skeys)
            valid_aux_removed += int(m.sum())
            users[k], items[k] = users[k][~m], items[k][~m]
        log.info("removed %d auxiliary interactions on %d of %d validation pairs (valid_aux=%s; %d of %d test "
                 "pairs occur in an auxiliary behavior)", valid_aux_removed, n_strip, len(vkeys), valid_aux,
                 int(test_any.sum()), len(test_keys))
    if valid_aux_removed:
        dropped["auxiliary_pairs_on_validation_items"] = valid_aux_removed
    on_valid = ("dropped" if valid_aux == "drop" or (n_strip and n_strip == int(in_any_aux.sum()))
                else "mirrored" if n_strip else "kept")

    train_user = np.concatenate(users)
    train_item = np.concatenate(items)
    train_beh = np.concatenate([np.full(len(u), k, dtype=np.int8) for k, u in enumerate(users)])
    # Canonical order: behavior, user, item.
    order = np.lexsort((train_item, train_user, train_beh))
    vo = np.lexsort((valid_item, valid_user))
    to = np.lexsort((test_item, test_user))
    manifest.update({
        "counts_input": counts_input,
        "validation": {"policy": valid, "seed": seed, "valid_aux": valid_aux,
                       "aux_interactions_on_valid_pairs": on_valid,
                       "valid_pairs_stripped_of_aux": int(n_strip),
                       "valid_pairs_in_an_aux_behavior": int((in_any_aux & ~strip).sum()),
                       "test_pairs_in_an_aux_behavior": int(test_any.sum()),
                       "test_pairs_in_aux_behaviors": test_in_aux,
                       "rule": "one target item per user with >= 2 training target items "
                               + ("(latest by timestamp)" if target_timestamps is not None else "(seeded random)")},
        "dropped": dropped,
        "n_test_users": int(len(np.unique(test_user))),
    })
    return PreparedDataset(
        n_users=int(n_users), n_items=int(n_items), behaviors=list(behaviors),
        train_user=train_user[order].astype(np.int32), train_item=train_item[order].astype(np.int32),
        train_behavior=train_beh[order],
        valid_user=valid_user[vo].astype(np.int32), valid_item=valid_item[vo].astype(np.int32),
        test_user=test_user[to].astype(np.int32), test_item=test_item[to].astype(np.int32),
        manifest=manifest)


def check_output(out: Path, inputs: list[Path], overwrite: bool) -> None:
    """Refuse, before any parsing, an ``out`` that would destroy input or cannot be written.

    ``atomic_dir`` replaces ``out`` wholesale under ``overwrite``; when ``out`` is, contains or lies
    inside an input that would delete the user's raw data, so it is never allowed. An existing
    directory is replaced only when it is a previous prepared output (or empty). Writability is
    probed by creating (and removing) a directory where the temporary output will go, so a
    read-only destination fails in a second rather than after a long parse.
    """
    out = Path(out)
    out_r = out.resolve()
    for inp in inputs:
        in_r = Path(inp).resolve()
        if out_r == in_r:
            rel = "is"
        elif in_r.is_relative_to(out_r):
            rel = "contains"
        elif out_r.is_relative_to(in_r):
            rel = "lies inside"
        else:
            continue
        raise DataError(f"--out {rel} the input {in_r}; refusing (it would overwrite the raw data); choose an "
                        "output directory outside the input", file=str(out))
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise DataError("output directory already exists (pass --overwrite to replace it)", file=str(out))
        if not out.is_dir() or out.is_symlink():
            raise DataError("exists and is not a directory; refusing to replace it", file=str(out))
        if any(out.iterdir()) and not (out / MANIFEST).is_file():
            raise DataError(f"exists and is not a prepared dataset directory (no {MANIFEST}); refusing to "
                            "replace it; choose another --out", file=str(out))
    anc = out_r.parent
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir():
        raise DataError(f"cannot create the output directory: {anc} is not a directory", file=str(out))
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".mbssl-write-probe-", dir=anc))
    except OSError as e:
        raise DataError(f"output location is not writable ({anc}: {e.strerror or e})", file=str(out)) from None


def _inputs(paths: list[Path]) -> list[dict]:
    return [{"file": str(p.resolve()), "sha256": sha256_file(p), "bytes": p.stat().st_size} for p in paths]


def prepare_text(input_dir: Path, out: Path, *, behaviors=None, target=None, n_users=None, n_items=None,
                 seed=0, valid="one-per-user", on_test_in_train: OnTestInTrain = "error", valid_aux="auto",
                 overwrite=False) -> PreparedDataset:
    from .text import read_text_dir

    t0 = time.time()
    check_output(out, [Path(input_dir)], overwrite)
    td = read_text_dir(Path(input_dir), behaviors, target, n_users, n_items)
    manifest = {"source": {"format": "text", "input": str(Path(input_dir).resolve())},
                "inputs": _inputs(list(td.files.values())), "behavior_order": td.order}
    ds = assemble(td.behaviors, td.users, td.items, td.test_user, td.test_item, td.n_users, td.n_items,
                  seed=seed, valid=valid, on_test_in_train=on_test_in_train, valid_aux=valid_aux,
                  test_file=str(td.files["test"]),
                  manifest=manifest)
    return _write(ds, out, overwrite, t0)


def prepare_table(input_path: Path, out: Path, *, behaviors=None, target=None, seed=0,
                  valid="one-per-user", on_test_in_train: OnTestInTrain = "error", valid_aux="auto",
                  overwrite=False) -> PreparedDataset:
    from .table import read_table

    t0 = time.time()
    input_path = Path(input_path)
    check_output(out, [input_path], overwrite)
    td = read_table(input_path, behaviors, target, seed)
    manifest = {"source": {"format": "table", "input": str(input_path.resolve()),
                           "split": "timestamp" if td.timestamps is not None else "seeded"},
                "inputs": _inputs([input_path]), "behavior_order": td.order,
                "table": {"duplicate_rows_merged": td.duplicates_merged,
                          "users_without_test (single target interaction)": td.users_without_test}}
    ds = assemble(td.behaviors, td.users, td.items, td.test_user, td.test_item, len(td.user_ids),
                  len(td.item_ids), seed=seed, valid=valid, on_test_in_train=on_test_in_train, valid_aux=valid_aux,
                  target_timestamps=td.timestamps, test_file=str(input_path), manifest=manifest)
    extra = {"user_map": pa.table({"index": pa.array(np.arange(len(td.user_ids), dtype=np.int32)),
                                   "id": pa.array(td.user_ids.tolist(), pa.string())}),
             "item_map": pa.table({"index": pa.array(np.arange(len(td.item_ids), dtype=np.int32)),
                                   "id": pa.array(td.item_ids.tolist(), pa.string())})}
    return _write(ds, out, overwrite, t0, extra)


def prepare_synthetic(out: Path, spec=None, *, seed: int | None = None, valid="one-per-user",
                      valid_aux="auto", overwrite=False) -> PreparedDataset:
    from .synthetic import SyntheticSpec, generate

    t0 = time.time()
    check_output(out, [], overwrite)
    spec = spec or SyntheticSpec()
    if seed is not None:
        spec.seed = seed
    pairs, tu, ti = generate(spec)
    manifest = {"source": {"format": "synthetic", "spec": spec.to_dict()}, "inputs": [],
                "behavior_order": {"behaviors": list(spec.behaviors), "target": spec.behaviors[-1],
                                   "chosen_by": "synthetic generator spec", "warnings": []}}
    ds = assemble(list(spec.behaviors), [p[0] for p in pairs], [p[1] for p in pairs], tu, ti,
                  spec.n_users, spec.n_items, seed=spec.seed, valid=valid, valid_aux=valid_aux, manifest=manifest)
    return _write(ds, out, overwrite, t0)


def _write(ds: PreparedDataset, out: Path, overwrite: bool, t0: float, extra=None) -> PreparedDataset:
    try:
        with atomic_dir(out, overwrite=overwrite) as tmp:
            ds.manifest["prepare_seconds"] = round(time.time() - t0, 3)
            write_prepared(tmp, ds, extra)
    except FileExistsError:
        raise DataError("output directory already exists (pass --overwrite to replace it)", file=str(out)) from None
    except OSError as e:  # disk full, permissions changed mid-run: nothing was published
        raise DataError(f"cannot write the output directory ({e.strerror or e})", file=str(out)) from None
    ds.path = Path(out)
    log.info("prepared %s: %d users x %d items, counts %s, %d valid, %d test", out, ds.n_users, ds.n_items,
             ds.manifest["counts"], len(ds.valid_user), len(ds.test_user))
    return ds
