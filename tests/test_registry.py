"""The registry: PML built-ins, our plugins, nested specs, entry points, errors."""

import sys
import textwrap

import pytest
import torch
from pytorch_metric_learning import (
    distances,
    losses,
    miners,
    reducers,
    regularizers,
    samplers,
    trainers,
)

from pml_plugins import registry


def test_pml_builtins_resolve_by_name_and_kind():
    assert registry.get("TripletMarginLoss") is losses.TripletMarginLoss
    assert registry.get("MultiSimilarityMiner", "miners") is miners.MultiSimilarityMiner
    assert registry.get("CosineSimilarity", "distances") is distances.CosineSimilarity
    assert registry.get("MPerClassSampler", "samplers") is samplers.MPerClassSampler
    assert registry.get("MetricLossOnly", "trainers") is trainers.MetricLossOnly
    assert registry.get("Adam", "optimizers") is torch.optim.Adam
    assert registry.get("StepLR", "lr_schedulers") is torch.optim.lr_scheduler.StepLR
    assert registry.get("SmallCNN", "models").__name__ == "SmallCNN"


def test_every_pml_loss_and_miner_is_listed():
    names = set(registry.names("losses"))
    expected = {
        n
        for n in dir(losses)
        if n.endswith("Loss")
        and isinstance(getattr(losses, n), type)
        and issubclass(getattr(losses, n), losses.BaseMetricLossFunction)
    }
    assert expected <= names
    assert {"MultiSimilarityMiner", "TripletMarginMiner", "BatchHardMiner"} <= set(
        registry.names("miners")
    )


def test_build_resolves_nested_specs():
    loss = registry.build(
        {
            "TripletMarginLoss": {
                "margin": 0.3,
                "distance": {"CosineSimilarity": {}},
                "reducer": "MeanReducer",
                "embedding_regularizer": {"LpRegularizer": {"p": 2}},
            }
        }
    )
    assert isinstance(loss, losses.TripletMarginLoss)
    assert loss.margin == 0.3
    assert isinstance(loss.distance, distances.CosineSimilarity)
    # PML wraps the reducer once a regularizer is present
    assert isinstance(loss.reducer.reducers["loss"], reducers.MeanReducer)
    assert isinstance(loss.embedding_regularizer, regularizers.LpRegularizer)


def test_build_nested_inner_loss_of_a_wrapper():
    wrapper = registry.build(
        {"CrossBatchMemory": {"loss": "ContrastiveLoss", "embedding_size": 8, "memory_size": 16}}
    )
    assert isinstance(wrapper.loss, losses.ContrastiveLoss)


def test_build_passes_runtime_kwargs():
    params = [torch.nn.Parameter(torch.zeros(3))]
    opt = registry.build({"SGD": {"lr": 0.1}}, "optimizers", params=params)
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["lr"] == 0.1


def test_unknown_name_suggests_close_names():
    with pytest.raises(registry.UnknownComponentError) as err:
        registry.get("TripletMarginLos")
    assert "TripletMarginLoss" in str(err.value)
    assert "pml-plugins list" in str(err.value)


@pytest.mark.parametrize(
    ("name", "kind", "found"),
    [
        ("TripletMarginLoss", "miners", "a loss"),
        ("MultiSimilarityMiner", "losses", "a miner"),
        ("Adam", "losses", "an optimizer"),
        ("StepLR", "optimizers", "a learning-rate scheduler"),
    ],
)
def test_wrong_kind_is_reported(name, kind, found):
    with pytest.raises(registry.UnknownComponentError, match=f"registered, but as {found}\\)"):
        registry.get(name, kind)


def test_unknown_kwarg_names_the_allowed_ones():
    with pytest.raises(TypeError, match="does not take 'marginn'.*margin"):
        registry.build({"TripletMarginLoss": {"marginn": 1}})


def test_bad_spec_shape():
    with pytest.raises(ValueError, match="Name"):
        registry.parse_spec({"A": {}, "B": {}})


def test_third_party_entry_point_resolves(tmp_path, monkeypatch):
    """A throw-away installed distribution exposes a loss through the entry-point group."""
    pkg = tmp_path / "thirdparty_dml"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        textwrap.dedent(
            """
            from pytorch_metric_learning.losses import ContrastiveLoss

            class ThirdPartyLoss(ContrastiveLoss):
                pass
            """
        )
    )
    dist = tmp_path / "thirdparty_dml-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-dml\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[pml_plugins]\nThirdPartyLoss = thirdparty_dml:ThirdPartyLoss\n"
        "losses.ExplicitKindLoss = thirdparty_dml:ThirdPartyLoss\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.refresh()
    try:
        entry = registry.entry("ThirdPartyLoss")
        assert entry.kind == "losses" and entry.is_plugin and entry.source == "thirdparty-dml"
        assert registry.entry("ExplicitKindLoss", "losses").cls is entry.cls
        loss = registry.build({"ThirdPartyLoss": {"neg_margin": 0.7}})
        assert loss.neg_margin == 0.7
    finally:
        monkeypatch.delitem(sys.modules, "thirdparty_dml", raising=False)
        monkeypatch.undo()
        registry.refresh()
    with pytest.raises(registry.UnknownComponentError):
        registry.get("ThirdPartyLoss")


def test_runtime_register():
    class LocalLoss(losses.ContrastiveLoss):
        pass

    registry.register(LocalLoss)
    try:
        assert registry.entry("LocalLoss").kind == "losses"
    finally:
        registry.refresh()


def test_lowercase_string_under_nested_key_passes_through():
    assert registry._resolve("loss", "contrastive") == "contrastive"
    with pytest.raises(registry.UnknownComponentError):
        registry._resolve("loss", "ContrastiveLos")
    assert isinstance(registry._resolve("loss", "ContrastiveLoss"), losses.ContrastiveLoss)


def test_misspelt_nested_dict_spec_fails_to_build():
    with pytest.raises(registry.UnknownComponentError, match="CosineSimilarity"):
        registry.build({"TripletMarginLoss": {"distance": {"CosineSimilarty": {}}}})
    assert not registry.is_spec({"lowercase": {}}) and registry.is_spec({"MeanReducer": None})
    assert not registry.is_spec({"MeanReducer": 5}) and not registry.is_spec({1: {}})


def test_build_accepting_passes_only_the_runtime_kwargs_a_class_takes():
    loss = registry.build_accepting(
        {"ProxyAnchorLoss": {"margin": 0.2}}, "losses", num_classes=3, embedding_size=4, labels=[1]
    )
    assert loss.proxies.shape == (3, 4) and loss.margin == 0.2
    # the spec's own value wins over the runtime one
    loss = registry.build_accepting(
        {"ProxyAnchorLoss": {"num_classes": 5}}, "losses", num_classes=3, embedding_size=4
    )
    assert loss.proxies.shape == (5, 4)


def test_constructor_defaults_follow_the_kwargs_chain():
    defaults = registry.constructor_defaults(losses.MultiSimilarityLoss)
    assert defaults["alpha"] == 2 and defaults["base"] == 0.5  # its own
    assert "reducer" in defaults and "distance" in defaults  # BaseMetricLossFunction's
