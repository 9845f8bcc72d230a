"""Typed run configuration: one dataclass per TOML section, a docstring per field.

Loaded from ``configs/NAME.toml`` plus ``--set section.field=value`` overrides and
validated *before* anything is built: an unknown key, a wrong type or an out-of-range value
is an error that names the field and says what is expected.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


class ConfigError(ValueError):
    pass


@dataclass
class DataConfig:
    format: Literal["text", "table", "synthetic", "prepared"] = "synthetic"
    """Where the data comes from: raw ``text`` dir, ``table`` file, ``synthetic`` generator,
    or an already ``prepared`` directory."""
    path: str = ""
    """Input path (text dir, table file or prepared dir); relative paths are resolved
    against the config file's directory. Unused for synthetic."""
    cache_dir: str = "cache"
    """Where prepared data and swing output are cached (relative to the working dir)."""
    behaviors: list[str] = field(default_factory=list)
    """Behavior order, weakest first, target last; empty = importer default."""
    target: str = ""
    """Target behavior name; empty = last behavior."""
    n_users: int = 0
    """Declared number of users for text data (0 = max id + 1)."""
    n_items: int = 0
    """Declared number of items for text data (0 = max id + 1)."""
    valid: Literal["one-per-user", "none"] = "one-per-user"
    """Validation split: one target item per user with >= 2 purchases, or none."""
    valid_aux: Literal["auto", "keep", "drop"] = "auto"
    """Auxiliary interactions on validation pairs. ``auto`` mirrors how the test was built: it
    drops them all when no test pair occurs in an auxiliary behavior (Retailrocket, IJCAI), and
    when the validation's share of pairs found in an auxiliary behavior exceeds the test's
    beyond sampling noise (pv-less Beibei: 100 % against 62 %) it drops them on a seeded random
    subset of validation pairs until the shares are equal; otherwise it keeps them."""
    split_seed: int = 0
    """Seed of the validation split (and of the synthetic generator)."""
    synthetic_users: int = 600
    """Synthetic generator: number of users."""
    synthetic_items: int = 400
    """Synthetic generator: number of items."""
    synthetic_clusters: int = 8
    """Synthetic generator: number of planted clusters."""


@dataclass
class SwingConfig:
    alpha: float = 0.5
    """Swing smoothing term alpha of Eq 6."""
    weights: dict[str, float] = field(default_factory=dict)
    """Behavior weights of the combined similarity; empty = equal weights over all behaviors.
    The authors' Beibei matrix is buy-only: ``{buy = 1.0}``."""
    topn: int = 500
    """Neighbors kept per node (must be >= the largest false-negative count used)."""
    workers: int = 2
    """Worker processes used to compute swing when it is not cached."""


@dataclass
class ModelConfig:
    dim: int = 64
    """Embedding size d."""
    n_layers: int = 2
    """Propagation layers L (paper and authors' code: 4; every tuned config here uses 2, which
    halves the propagation cost per step: README, "Large batches" and "Speed")."""
    att_dim: int = 16
    """Hidden size of the CDM attention."""
    dropout: float = 0.3
    """Dropout on each layer's output."""
    norm: Literal["sym", "row"] = "sym"
    """Adjacency normalization: symmetric (authors' code) or row/mean (paper text)."""
    use_cdm: bool = True
    """Cross-behavior dependency module (ablation: false)."""
    interaction_scoring: bool | Literal["auto"] = "auto"
    """Beyond the paper: add learned per-behavior 'already interacted' weights and an item
    bias to the score. ``auto``: on, unless no test pair of the prepared data occurs in an
    auxiliary behavior (a split built that way, e.g. Retailrocket and IJCAI: there the 'already
    viewed / carted' terms can only rank the held-out items down; README "The default recipe").
    The run records what ``auto`` became. Off in paper-faithful configs."""
    init_scale: float = 1.0
    """Multiplier on the xavier-uniform bound of the user and item embeddings (1 = the
    authors' init). On pv-less Beibei 10 shortened the early plateau somewhat, 30 and 100 did
    not learn in 5 epochs; HMG relax = 1 is what removed it (README, "Large batches")."""
    item_bias: bool = True
    """Beyond the paper: a learned per-item bias b_i in the target behavior's score, also where
    the interaction term is off (``interaction_scoring`` always includes it). It is the
    popularity the model can learn in its first steps: on Retailrocket (interaction term off)
    test R@10 after epoch 1 was .0350 with it against .0133 without (popularity .0382), on
    IJCAI, where popularity is weak, .0020 against .0093 (README "The default recipe"). Off in
    paper-faithful configs."""
    interaction_per_item: bool = True
    """With interaction_scoring: one more learned weight per (behavior, item) on the 'already
    interacted' indicator, i.e. per-item conversion from view/cart to buy. Left unset, it follows
    ``interaction_scoring`` off."""


@dataclass
class LossConfig:
    neg_weight: list[float] = field(default_factory=lambda: [0.1])
    """c- of the non-sampling loss, one per behavior or a single value for all."""
    lambdas: list[float] = field(default_factory=list)
    """Weight of each behavior's non-sampling loss (empty = 1/K each)."""
    decay: float = 0.01
    """Weight decay on the batch's propagated embeddings (and all items'). The authors' Beibei
    value 10 keeps sparse targets from learning at all (IJCAI: test R@10 .0002 after one epoch
    with 10, .0093 with 0.01; README "The default recipe")."""
    tau: float = 0.5
    """InfoNCE temperature."""
    fn_users: int = 10
    """False negatives removed per user (top-N swing neighbors); 0 = none."""
    fn_items: int = 10
    """False negatives removed per item; 0 = none."""
    fn_mode: Literal["remove", "reference"] = "remove"
    """``remove`` drops false negatives from the InfoNCE denominator; ``reference`` zeroes
    their logits like the authors' code."""
    use_inter: bool = True
    """Inter-behavior SSL (ablation: false)."""
    use_intra: bool = True
    """Intra-behavior SSL (ablation: false)."""
    intra_view: Literal["edge", "node"] = "node"
    """Random views for intra SSL: edge dropout (paper) or node dropout (authors' code)."""
    intra_dropout: float = 0.5
    """Drop probability of the intra-SSL views."""
    intra_weight: float = 1.0
    """Scale of the intra-behavior SSL loss (reference ``ssl_reg``)."""
    inter_weight: float = 1.0
    """Scale of each inter-behavior SSL loss (reference ``ssl_reg_inter``)."""
    negatives: Literal["all", "sampled"] = "all"
    """InfoNCE denominators: ``all`` candidates (exact, the paper) or ``sampled`` (large graphs,
    beyond the paper): per step and side ``n_negatives`` drawn candidates shared by the batch
    (plus each anchor's own positive, or the batch's with ``in_batch_negatives``), logQ-corrected,
    false negatives still removed."""
    n_negatives: int = 4096
    """With negatives = "sampled": candidates drawn (with replacement) per step per side; a side
    with at most this many candidates stays exact."""
    negative_sampler: Literal["uniform", "popularity"] = "uniform"
    """With negatives = "sampled": draw uniformly or in proportion to training interactions + 1."""
    negative_estimator: Literal["logq", "control_variate"] = "control_variate"
    """With negatives = "sampled": ``logq`` = each sampled logit minus log of its inclusion
    probability; ``control_variate`` = the same plus the linear part of every term taken
    exactly over all candidates (one O(|C|·d) pass per step; lower variance; needs
    fn_mode = "remove")."""
    in_batch_negatives: bool = False
    """With negatives = "sampled": ``true`` also scores every anchor against the whole batch's
    positives (π = 1), O(batch·(N + batch)·d) per step; ``false`` (the default) only against its
    own positive plus the sample, O(batch·N·d): linear in the batch, which ``train.batch_size =
    0`` grows with |U| (the same Taobao_MBCGCN quality; README "Sampled negatives"). ``false``
    needs fn_mode = "remove"."""
    view_propagation: Literal["target", "full"] = "target"
    """Intra-SSL views: propagate only the target behavior over each view, reusing the main
    pass's auxiliary messages (fast), or a full K-behavior propagation per view (authors' code)."""


@dataclass
class HMGConfig:
    strategy: Literal["hmg", "A", "B", "C", "none"] = "hmg"
    """Gradient manipulation: full HMG, ablations A (direction), B (magnitude), C (both,
    always), or none (equal-weight sum)."""
    beta: float = 0.9
    """EMA factor of the gradient norms."""
    relax: float = 1.0
    """Relax factor r of the magnitude rescaling (authors' default 0.7; 1 scales every auxiliary
    gradient down to the target's norm, which large batches need: README, "Large batches")."""
    norm_source: Literal["ema", "current"] = "ema"
    """Norms used in the rescaling: EMAs (authors' code) or current norms (paper Eq 14)."""
    aux_budget: float = 0.1
    """Beyond the paper: after the strategy, the auxiliary gradients of each parameter tensor
    are scaled down together so that the sum of their norms is at most this multiple of the
    target gradient's norm (0 = off, the paper). Keeps the SSL tasks from swamping the target
    at the start, when their gradients are 10^2-10^4 x the target's."""
    aux_budget_rows: bool = True
    """Apply hmg.aux_budget per row of each matrix (each user's, item's or relation's vector)
    instead of per tensor: Adam normalizes per coordinate, so an auxiliary gradient on rows the
    target does not touch would otherwise still be a full-size step there."""


@dataclass
class TrainConfig:
    epochs: int = 100
    """Maximum number of epochs: a cap; runs normally end at the early stop (``patience``)."""
    batch_size: int = 0
    """Global user batch size (split across ranks); 0 = auto: about 16 steps per epoch
    (``auto_batch_size``), so a small dataset still gets several updates per epoch and a large
    one is not paying a full-graph propagation per 256 users."""
    lr: float = 1e-2
    """Adam learning rate (authors' code: 1e-3, at batch 256)."""
    lr_decay: float = 1.0
    """Multiply the learning rate by this after ``lr_patience`` evaluations in a row without a
    validation improvement on ``select_metric`` (torch's ``ReduceLROnPlateau``; 1 = a constant
    rate, as in the paper). Beyond the paper. The early stop (``patience``) counts the same
    evaluations and is not reset by a decay."""
    lr_patience: int = 2
    """Evaluations without a validation improvement before each ``lr_decay``."""
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam (β1, β2). (On pv-less Beibei at batch 4096, β2 = 0.99 or 0.9 instead of 0.999 did not
    shorten the early plateau: README, "Large batches".)"""
    seed: int = 2020
    """Seed of everything random in training (init, batches, dropout, views)."""
    eval_every: int = 1
    """Validate (and test) every E epochs, and after the last; each evaluation ranks all users
    over all items (its seconds are in the log line and timings.jsonl, README "Speed")."""
    patience: int = 5
    """Stop after this many evaluations without validation improvement (0 = never)."""
    select_metric: str = "recall@10"
    """Validation metric used for model selection."""
    ks: list[int] = field(default_factory=lambda: [10, 50])
    """Cut-offs of Recall@K and NDCG@K."""
    eval_batch_size: int = 1024
    """Users per evaluation batch (the metric sums' granularity); each batch is scored in
    sub-batches of at most ``evaluate.EVAL_BLOCK_ELEMS // n_items`` users."""
    max_steps_per_epoch: int = 0
    """Cap on steps per epoch for smoke runs (0 = full epoch)."""
    device: str = "auto"
    """``auto`` (cuda if available), ``cpu`` or ``cuda``."""
    threads: int = 0
    """torch intra-op threads per process (0 = torch default)."""
    keep_freed_memory: bool = False
    """glibc (Linux): ``true`` takes large host blocks from the heap and keeps freed memory for
    reuse (``mallopt``), so each step's large temporaries do not page-fault fresh memory again
    (1.1-1.3x per step from ~40k users); ``false`` (the default) = the C library's defaults.
    Opt-in: with it on, a worker of a 2-rank run stopping on a non-finite loss aborted at exit
    ("terminate called without an active exception") in 2 of ~40 tries, not seen with it off.
    No effect on results."""
    sparse_backend: str = "auto"
    """Kernel of the sparse adjacency products: ``auto`` (scipy for CPU tensors, torch's sparse
    CSR kernel for CUDA tensors), ``scipy`` (CPU only) or ``torch`` (any device; on CPU this
    runs the GPU code path, which is how CI exercises it without a GPU)."""


@dataclass
class RunConfig:
    name: str = "run"
    """Run name (MLflow run name and output sub-directory)."""
    output_dir: str = "runs"
    """Parent directory of run outputs (metrics.jsonl, final.json, config, plots)."""
    tracking_uri: str = ""
    """MLflow tracking URI; empty = $MLFLOW_TRACKING_URI or the local sqlite:///mlflow.db."""
    experiment: str = "mbssl"
    """MLflow experiment name."""
    mlflow: bool = True
    """Log to MLflow (rank 0 only)."""
    progress: bool = True
    """tqdm progress bars on rank 0."""
    resume: Literal["auto", "never", "require"] = "auto"
    """``auto``: continue from the newest complete checkpoint in ``OUTPUT/NAME/checkpoints/``
    when there is one (it must come from the same config, else an error names the fields that
    differ), else start fresh; ``never``: start fresh (the previous run's outputs, checkpoints
    and model in that directory are removed first); ``require``: fail unless a checkpoint exists."""


@dataclass
class CheckpointConfig:
    every_epochs: int = 1
    """Write a checkpoint after every N epochs (0 = only ``every_steps``). A checkpoint holds
    everything a resumed run needs to continue bit for bit."""
    every_steps: int = 0
    """Also write one every N training steps inside long epochs (0 = off)."""
    keep: int = 2
    """Complete checkpoints kept (the oldest beyond this are deleted once a new one is complete)."""


@dataclass
class DistConfig:
    partition: Literal["edge-balanced", "range", "metis"] = "edge-balanced"
    """How users are assigned to ranks when no partition directory is given: ``range`` keeps
    each rank's users one contiguous id range (its dropout-mask blocks are then local)."""
    partition_dir: str = ""
    """A directory written by ``python -m mbssl_dist.partition`` with as many parts as ranks;
    each rank then loads only its part."""
    collectives: Literal["auto", "gloo", "shm"] = "auto"
    """CPU jobs: how the per-layer reduce-scatters / all-gathers travel. ``shm``: through
    shared memory (all ranks on one host); ``gloo``: gloo's TCP transport; ``auto``: shm when
    every rank is on this host and the platform is x86-64 Linux, else gloo. GPU jobs use nccl."""


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    swing: SwingConfig = field(default_factory=SwingConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    hmg: HMGConfig = field(default_factory=HMGConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    source: str = ""
    """The config file this came from (set by ``load_config``)."""

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("source", None)
        return d

    def flat(self) -> dict[str, Any]:
        out = {}
        for sec, vals in self.to_dict().items():
            for k, v in vals.items():
                out[f"{sec}.{k}"] = v
        return out


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config) if f.name != "source"}


def _section_cls(name: str):
    return {"data": DataConfig, "swing": SwingConfig, "model": ModelConfig, "loss": LossConfig,
            "hmg": HMGConfig, "train": TrainConfig, "run": RunConfig, "dist": DistConfig,
            "checkpoint": CheckpointConfig}[name]


def _check_type(where: str, value: Any, tp) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for alt in typing.get_args(tp):
            try:
                return _check_type(where, value, alt)
            except ConfigError:
                pass
        allowed = " or ".join("true / false" if a is bool else " / ".join(map(repr, typing.get_args(a)))
                              for a in typing.get_args(tp))
        raise ConfigError(f"{where} = {value!r}: expected {allowed}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where} = {value!r}: expected one of {list(allowed)}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} = {value!r}: expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} = {value!r}: expected an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} = {value!r}: expected a number")
        if not math.isfinite(value):  # TOML accepts nan and inf; no setting means either
            raise ConfigError(f"{where} = {value!r}: expected a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} = {value!r}: expected a string")
        return value
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            example = "[1, 2]" if inner in (int, float) else '["a", "b"]'
            raise ConfigError(f"{where} = {value!r}: expected a list, e.g. {example}")
        return [_check_type(f"{where}[{i}]", v, inner) for i, v in enumerate(value)]
    if origin is dict:
        _, vt = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where} = {value!r}: expected a table, e.g. {{buy = 1.0}}")
        return {str(k): _check_type(f"{where}.{k}", v, vt) for k, v in value.items()}
    return value


def interaction_off(m: ModelConfig) -> None:
    """The interaction term off takes its per-item refinement with it (``interaction_per_item``'s
    default refines a term that is then absent). The one place that rule is written."""
    m.interaction_scoring = False
    m.interaction_per_item = False


def from_dict(raw: dict, source: str = "") -> Config:
    cfg = Config(source=source)
    for sec, vals in raw.items():
        if sec not in SECTIONS:
            raise ConfigError(f"unknown section [{sec}]; valid sections: {sorted(SECTIONS)}")
        if not isinstance(vals, dict):
            raise ConfigError(f"[{sec}] must be a table of settings")
        cls = _section_cls(sec)
        hints = typing.get_type_hints(cls)
        obj = getattr(cfg, sec)
        for k, v in vals.items():
            if k not in hints:
                raise ConfigError(f"unknown field {sec}.{k}; valid fields of [{sec}]: {sorted(hints)}")
            setattr(obj, k, _check_type(f"{sec}.{k}", v, hints[k]))
    if cfg.model.interaction_scoring is False and "interaction_per_item" not in raw.get("model", {}):
        interaction_off(cfg.model)
    validate(cfg)
    return cfg


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # bare string


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for ov in overrides:
        if "=" not in ov or "." not in ov.split("=", 1)[0]:
            raise ConfigError(f"--set {ov!r}: expected section.field=value, e.g. train.epochs=5")
        key, val = ov.split("=", 1)
        sec, name = key.strip().split(".", 1)
        raw.setdefault(sec, {})[name] = _parse_value(val.strip())
    return raw


def read_toml(path: str | Path, what: str = "config file") -> dict:
    """A TOML file as a dict; a missing or invalid file is a ConfigError naming it."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {p} not found")
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: invalid TOML: {e}") from e


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    raw: dict = {}
    source = ""
    if path:
        raw = read_toml(path)
        source = str(Path(path).resolve())
    raw = apply_overrides(raw, overrides or [])
    cfg = from_dict(raw, source)
    if cfg.data.path and source and not Path(cfg.data.path).is_absolute():
        cfg.data.path = str((Path(source).parent / cfg.data.path).resolve())
    return cfg


AUTO_STEPS_PER_EPOCH = 16


def auto_batch_size(batch_size: int, n_users: int) -> int:
    """``train.batch_size``, or for 0 (auto) ceil(n_users / 16) rounded to the nearest multiple of
    128 and kept within [128, 4096]: Retailrocket's 2,174 users get 128 (17 steps), pv-less
    Beibei's 21,716 get 1,408, pv-less Taobao's 48,749 get 3,072."""
    if batch_size:
        return batch_size
    b = -(-n_users // AUTO_STEPS_PER_EPOCH)
    return min(4096, max(128, int(b / 128 + 0.5) * 128))


def _positive(where: str, v, strict=True):
    if (v <= 0) if strict else (v < 0):
        raise ConfigError(f"{where} = {v}: must be {'> 0' if strict else '>= 0'}")


def validate(cfg: Config) -> None:
    """Range and consistency checks that do not need the data."""
    m, lo, h, t, d = cfg.model, cfg.loss, cfg.hmg, cfg.train, cfg.data
    for where, v in [("model.dim", m.dim), ("model.n_layers", m.n_layers), ("model.att_dim", m.att_dim),
                     ("train.epochs", t.epochs), ("train.lr", t.lr),
                     ("train.eval_every", t.eval_every), ("train.eval_batch_size", t.eval_batch_size),
                     ("loss.tau", lo.tau), ("swing.alpha", cfg.swing.alpha), ("swing.topn", cfg.swing.topn),
                     ("swing.workers", cfg.swing.workers)]:
        _positive(where, v)
    for where, v in [("train.batch_size", t.batch_size),
                     ("loss.decay", lo.decay), ("loss.fn_users", lo.fn_users), ("loss.fn_items", lo.fn_items),
                     ("train.patience", t.patience), ("train.max_steps_per_epoch", t.max_steps_per_epoch),
                     ("loss.intra_weight", lo.intra_weight), ("loss.inter_weight", lo.inter_weight), ("train.threads", t.threads),
                     ("checkpoint.every_epochs", cfg.checkpoint.every_epochs),
                     ("checkpoint.every_steps", cfg.checkpoint.every_steps),
                     ("data.n_users", d.n_users), ("data.n_items", d.n_items)]:
        _positive(where, v, strict=False)
    _positive("checkpoint.keep", cfg.checkpoint.keep)
    _positive("train.lr_patience", t.lr_patience)
    if not 0 < t.lr_decay <= 1:
        raise ConfigError(f"train.lr_decay = {t.lr_decay}: must be in (0, 1] (1 = a constant learning rate)")
    if not h.aux_budget >= 0:
        raise ConfigError(f"hmg.aux_budget = {h.aux_budget}: must be >= 0 (0 = off)")
    if len(t.adam_betas) != 2 or not all(0 <= b < 1 for b in t.adam_betas):
        raise ConfigError(f"train.adam_betas = {t.adam_betas}: need two numbers in [0, 1), e.g. [0.9, 0.999]")
    if lo.negatives == "sampled" and lo.negative_estimator == "control_variate" and lo.fn_mode != "remove":
        raise ConfigError("loss.negative_estimator = 'control_variate' (the default) needs loss.fn_mode = 'remove'; "
                          "set loss.negative_estimator = 'logq' for the reference false-negative mode")
    if lo.negatives == "sampled" and not lo.in_batch_negatives and lo.fn_mode != "remove":
        raise ConfigError("loss.in_batch_negatives = false (the default) needs loss.fn_mode = 'remove'; "
                          "set loss.in_batch_negatives = true for the reference false-negative mode")
    if lo.negatives == "sampled" and lo.n_negatives < 1:
        raise ConfigError(f"loss.n_negatives = {lo.n_negatives}: must be >= 1 with loss.negatives = 'sampled'")
    if not 0 <= m.dropout < 1:
        raise ConfigError(f"model.dropout = {m.dropout}: must be in [0, 1)")
    if not m.init_scale > 0:
        raise ConfigError(f"model.init_scale = {m.init_scale}: must be > 0")
    if m.interaction_per_item and not m.interaction_scoring:
        raise ConfigError("model.interaction_per_item = true needs model.interaction_scoring = true "
                          "(the per-item weights refine the interaction term)")
    if not 0 <= lo.intra_dropout < 1:
        raise ConfigError(f"loss.intra_dropout = {lo.intra_dropout}: must be in [0, 1)")
    if not 0 <= h.beta < 1:
        raise ConfigError(f"hmg.beta = {h.beta}: must be in [0, 1)")
    if not 0 <= h.relax <= 1:
        raise ConfigError(f"hmg.relax = {h.relax}: must be in [0, 1]")
    if any(c < 0 or c > 1 for c in lo.neg_weight) or not lo.neg_weight:
        raise ConfigError(f"loss.neg_weight = {lo.neg_weight}: need one or K values in [0, 1]")
    if any(x < 0 for x in lo.lambdas):
        raise ConfigError(f"loss.lambdas = {lo.lambdas}: weights must be >= 0")
    if max(lo.fn_users, lo.fn_items) > cfg.swing.topn:
        raise ConfigError(f"loss.fn_users/fn_items ({lo.fn_users}/{lo.fn_items}) exceed swing.topn "
                          f"({cfg.swing.topn}); raise swing.topn")
    if not t.ks or any(k <= 0 for k in t.ks):
        raise ConfigError(f"train.ks = {t.ks}: need positive cut-offs, e.g. [10, 50]")
    metric, _, k = t.select_metric.partition("@")
    if metric not in ("recall", "ndcg") or not k.isdigit() or int(k) not in t.ks:
        raise ConfigError(f"train.select_metric = {t.select_metric!r}: expected recall@K or ndcg@K with K in "
                          f"train.ks {t.ks}")
    if d.format != "synthetic" and not d.path:
        raise ConfigError(f"data.path is required for data.format = {d.format!r}")
    if t.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"train.device = {t.device!r}: expected auto, cpu or cuda")
    if t.sparse_backend not in ("auto", "scipy", "torch"):
        raise ConfigError(f"train.sparse_backend = {t.sparse_backend!r}: expected auto, scipy or torch")
    if t.sparse_backend == "scipy" and t.device == "cuda":
        raise ConfigError("train.sparse_backend = 'scipy' needs CPU tensors but train.device = 'cuda': "
                          "use 'auto' or 'torch'")
    if any(w < 0 for w in cfg.swing.weights.values()):
        raise ConfigError(f"swing.weights = {cfg.swing.weights}: weights must be >= 0")


def check_runtime(cfg: Config) -> None:
    """Checks that need the machine, run at start before any process group or data: a config
    asking for a GPU on a machine without one is a config error, not a traceback."""
    if cfg.train.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("train.device = 'cuda' but CUDA is not available on this machine (torch "
                              f"{torch.__version__}); use train.device = \"auto\" or \"cpu\"")


def validate_against_data(cfg: Config, behaviors: list[str]) -> None:
    """Checks that need the dataset's behavior list."""
    K = len(behaviors)
    lo = cfg.loss
    if len(lo.neg_weight) not in (1, K):
        raise ConfigError(f"loss.neg_weight has {len(lo.neg_weight)} values; the data has {K} behaviors "
                          f"{behaviors}: give 1 or {K}")
    if lo.lambdas and len(lo.lambdas) != K:
        raise ConfigError(f"loss.lambdas has {len(lo.lambdas)} values; the data has {K} behaviors {behaviors}")
    unknown = [b for b in cfg.swing.weights if b not in behaviors]
    if unknown:
        raise ConfigError(f"swing.weights names unknown behavior(s) {unknown}; the data has {behaviors}")


def resolve_against_data(cfg: Config, manifest: dict, behaviors: list[str]) -> list[str]:
    """Settle the ``auto`` settings that depend on the prepared data (in place, so the run's
    records and checkpoints hold what ran); returns one log line per decision."""
    notes = []
    m = cfg.model
    if m.interaction_scoring == "auto":
        n = manifest.get("validation", {}).get("test_pairs_in_aux_behaviors")
        if len(behaviors) > 1 and n == 0:
            interaction_off(m)
            notes.append("model.interaction_scoring = 'auto' -> false: no test pair occurs in an auxiliary "
                         "behavior, so 'already interacted' can only rank held-out items down")
        else:
            m.interaction_scoring = True
            notes.append(f"model.interaction_scoring = 'auto' -> true ({n} test pairs occur in auxiliary behaviors)")
    return notes


def describe() -> str:
    """Every field with its default and docstring (for --help-config)."""
    import ast
    import inspect

    lines = []
    for sec in SECTIONS:
        cls = _section_cls(sec)
        src = ast.parse(inspect.getsource(cls))
        docs = {}
        body = src.body[0].body
        for a, b in zip(body, body[1:]):
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
                docs[a.target.id] = " ".join(str(b.value.value).split())
        lines.append(f"[{sec}]")
        inst = cls()
        for f in dataclasses.fields(cls):
            lines.append(f"  {f.name} = {getattr(inst, f.name)!r}  # {docs.get(f.name, '')}")
    return "\n".join(lines)
