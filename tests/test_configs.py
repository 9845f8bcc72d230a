"""The shipped configs and the built-in default recipe."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from mbssl_dist.config import ConfigError, auto_batch_size, load_config, resolve_against_data

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml"))

# fields where the built-in recipe departs from the paper / the authors' code
RECIPE_FIELDS = {"model": ["n_layers", "interaction_scoring", "interaction_per_item", "item_bias"], "loss": ["decay"],
                 "hmg": ["relax", "aux_budget", "aux_budget_rows"], "train": ["batch_size", "lr", "epochs"]}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_pin_every_recipe_field(path):
    """A change of the built-in defaults must not change what a shipped config runs."""
    raw = tomllib.loads(path.read_text())
    missing = [f"{s}.{f}" for s, fs in RECIPE_FIELDS.items() for f in fs if f not in raw.get(s, {})]
    assert not missing, f"{path.name} leaves {missing} to the built-in defaults"


def test_default_recipe():
    c = load_config(None)
    assert (c.model.n_layers, c.model.interaction_per_item, c.model.item_bias) == (2, True, True)
    assert (c.hmg.relax, c.hmg.aux_budget, c.hmg.aux_budget_rows) == (1.0, 0.1, True)
    assert (c.train.batch_size, c.train.lr, c.loss.decay, c.train.epochs) == (0, 0.01, 0.01, 100)
    assert c.model.interaction_scoring == "auto"


@pytest.mark.parametrize("n_users, want", [(1, 128), (2174, 128), (15449, 1024), (17435, 1152), (21716, 1408),
                                           (48749, 3072), (10**6, 4096)])
def test_auto_batch_size(n_users, want):
    assert auto_batch_size(0, n_users) == want
    assert auto_batch_size(300, n_users) == 300  # a set batch size is kept


def test_batch_size_must_not_be_negative():
    with pytest.raises(ConfigError, match="train.batch_size"):
        load_config(None, ["train.batch_size=-1"])


def test_interaction_off_takes_the_per_item_default_with_it():
    c = load_config(None, ["model.interaction_scoring=false"])
    assert not c.model.interaction_scoring and not c.model.interaction_per_item
    with pytest.raises(ConfigError, match="interaction_per_item"):  # both set, and contradictory
        load_config(None, ["model.interaction_scoring=false", "model.interaction_per_item=true"])


@pytest.mark.parametrize("in_aux, want", [(0, False), (5, True), (None, True)])
def test_interaction_auto_follows_how_the_test_pairs_were_built(in_aux, want):
    c = load_config(None)
    manifest = {"validation": {} if in_aux is None else {"test_pairs_in_aux_behaviors": in_aux}}
    assert len(resolve_against_data(c, manifest, ["view", "buy"])) == 1
    assert c.model.interaction_scoring is want and c.model.interaction_per_item is want
    assert resolve_against_data(c, manifest, ["view", "buy"]) == []  # settled: the records hold a bool
    c = load_config(None)
    resolve_against_data(c, {"validation": {"test_pairs_in_aux_behaviors": 0}}, ["buy"])
    assert c.model.interaction_scoring is True  # one behavior: nothing to be "in"


def test_interaction_scoring_values():
    assert load_config(None, ['model.interaction_scoring="auto"']).model.interaction_scoring == "auto"
    assert load_config(None, ["model.interaction_scoring=true"]).model.interaction_scoring is True
    with pytest.raises(ConfigError, match="model.interaction_scoring.*true / false or 'auto'"):
        load_config(None, ['model.interaction_scoring="yes"'])


def test_a_settled_auto_is_no_config_difference():
    """A checkpoint records what ``auto`` became; the same command (still ``auto``), settled on the
    same data, resumes it."""
    from mbssl_dist.config import resolve_against_data
    from mbssl_dist.train import config_differences

    on = load_config(None, ["model.interaction_scoring=true"]).to_dict()
    off = load_config(None, ["model.interaction_scoring=false", "model.interaction_per_item=false"]).to_dict()
    for in_aux, saved in [(5, on), (0, off)]:
        now = load_config(None)
        resolve_against_data(now, {"validation": {"test_pairs_in_aux_behaviors": in_aux}}, ["view", "buy"])
        assert config_differences(saved, now.to_dict()) == []
    other = load_config(None, ["model.interaction_scoring=true", "model.interaction_per_item=false"]).to_dict()
    now = load_config(None)
    resolve_against_data(now, {"validation": {"test_pairs_in_aux_behaviors": 5}}, ["view", "buy"])
    assert config_differences(other, now.to_dict()) == [
        "model.interaction_per_item (False in the checkpoint, True now)"]
    assert config_differences(on, load_config(None).to_dict())  # an unsettled auto is a difference


def test_a_field_added_since_a_checkpoint_counts_as_what_it_ran_with():
    """A checkpoint written before ``model.item_bias`` / ``train.lr_decay`` existed lacks them: its
    model had a bias exactly when the interaction term was on, and its rate was constant."""
    from mbssl_dist.train import config_differences

    def saved_without(cfg, *fields):
        d = cfg.to_dict()
        for f in fields:
            sec, k = f.split(".")
            del d[sec][k]
        return d

    new = ("model.item_bias", "train.lr_decay", "train.lr_patience", "loss.in_batch_negatives")
    on = load_config(None, ["model.interaction_scoring=true"])
    assert config_differences(saved_without(on, *new), on.to_dict()) == []
    off = load_config(None, ["model.interaction_scoring=false", "model.interaction_per_item=false",
                             "model.item_bias=false"])
    assert config_differences(saved_without(off, *new), off.to_dict()) == []
    off_bias = load_config(None, ["model.interaction_scoring=false", "model.interaction_per_item=false"])
    assert config_differences(saved_without(off_bias, *new), off_bias.to_dict()) == [
        "model.item_bias (False in the checkpoint, True now)"]
    decayed = load_config(None, ["model.interaction_scoring=true", "train.lr_decay=0.5"])
    assert config_differences(saved_without(on, *new), decayed.to_dict()) == [
        "train.lr_decay (1.0 in the checkpoint, 0.5 now)"]
    # loss.in_batch_negatives: an exact run resumes; a sampled one had the in-batch candidates
    sampled = load_config(None, ["model.interaction_scoring=true", 'loss.negatives="sampled"'])
    assert config_differences(saved_without(sampled, *new), sampled.to_dict()) == [
        "loss.in_batch_negatives (True in the checkpoint, False now)"]
    inb = load_config(None, ["model.interaction_scoring=true", 'loss.negatives="sampled"',
                             "loss.in_batch_negatives=true"])
    assert config_differences(saved_without(inb, *new), inb.to_dict()) == []
