"""ResNet50 / GoogLeNet trunks: heads removed, pooling, frozen BN across PML's train(),
offline weight errors, and one training iteration through the runner on miniature CUB."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from pml_plugins import registry
from pml_plugins.experiment import config as cfg_mod
from pml_plugins.experiment import run
from pml_plugins.models import SmallCNN
from pml_plugins.models.backbones import (
    GlobalPool,
    GoogLeNet,
    MapTrunk,
    ResNet50,
    WeightsNotFoundError,
)
from tests.datatrees import make_tree

BN = nn.modules.batchnorm._BatchNorm


@pytest.fixture(scope="module")
def resnet() -> ResNet50:
    torch.manual_seed(0)
    return ResNet50(weights=None)


def test_registered_as_models():
    assert registry.get("ResNet50", "models") is ResNet50
    assert registry.get("GoogLeNet", "models") is GoogLeNet
    trunk = registry.build({"ResNet50": {"weights": None, "pooling": "avg+max"}}, "models")
    assert isinstance(trunk, ResNet50) and trunk.net.avgpool.mode == "avg+max"


def test_resnet50_head_removed_and_pooling(resnet):
    x = torch.randn(2, 3, 32, 32)
    maps = {}
    hook = resnet.net.layer4.register_forward_hook(lambda m, i, o: maps.update(out=o))
    resnet.eval()
    with torch.no_grad():
        out = resnet(x)
    hook.remove()
    assert resnet.output_size == 2048 and out.shape == (2, 2048)
    assert torch.allclose(out, maps["out"].mean((2, 3)), atol=1e-5)  # GAP of layer4, no fc
    resnet.net.avgpool = GlobalPool("avg+max")
    with torch.no_grad():
        both = resnet(x)
    resnet.net.avgpool = GlobalPool("avg")
    assert torch.allclose(both, maps["out"].mean((2, 3)) + maps["out"].amax((2, 3)), atol=1e-5)
    with pytest.raises(ValueError, match="pooling"):
        GlobalPool("sum")


@pytest.mark.parametrize(
    ("make", "shape"),
    [
        (lambda: ResNet50(weights=None, pooling="avg+max"), (3, 2048, 2, 2)),
        (lambda: GoogLeNet(weights=None, pooling="avg+max"), (3, 1024, 2, 2)),
        (lambda: SmallCNN(in_channels=3, width=4), (3, 16, 16, 16)),
    ],
    ids=["ResNet50", "GoogLeNet", "SmallCNN"],
)
def test_trunks_expose_their_maps_before_pooling(make, shape):
    """feature_maps(x) are the maps that the trunk pools: forward(x) = pool(feature_maps(x)),
    bit for bit the network's own forward (torchvision's, for the backbones)."""
    torch.manual_seed(0)
    trunk = make().eval()
    assert isinstance(trunk, MapTrunk)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        maps = trunk.feature_maps(x)
        own = trunk.net(x) if hasattr(trunk, "net") else trunk.features(x)
        assert maps.shape == shape
        assert torch.equal(trunk(x), own)
        assert torch.equal(trunk.pool(maps), own)
        assert torch.equal(trunk(x, pooled=False), maps)


def _bn_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().clone()
        for m_name, m in model.named_modules()
        if isinstance(m, BN)
        for k, v in [(f"{m_name}.{n}", t) for n, t in [*m.named_buffers(), *m.named_parameters()]]
    }


def test_frozen_bn_stays_frozen_across_train(resnet):
    torch.manual_seed(0)
    frozen = ResNet50(weights=None, freeze_bn=True)
    free = resnet
    for model in (frozen, free):
        model.train()  # what PML's trainer calls each epoch
        assert model.training
    assert all(not m.training for m in frozen.modules() if isinstance(m, BN))
    assert all(
        not p.requires_grad for m in frozen.modules() if isinstance(m, BN) for p in m.parameters()
    )
    assert all(p.requires_grad for n, p in frozen.named_parameters() if "conv" in n)
    assert all(m.training for m in free.modules() if isinstance(m, BN))
    x = torch.randn(4, 3, 16, 16)
    before_frozen, before_free = _bn_state(frozen), _bn_state(free)
    frozen(x), free(x)
    after_frozen, after_free = _bn_state(frozen), _bn_state(free)
    assert all(torch.equal(before_frozen[k], after_frozen[k]) for k in before_frozen)
    assert not all(torch.equal(before_free[k], after_free[k]) for k in before_free)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """No network (every proxy points at a closed port) and an empty torch hub cache."""
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path / "hub" / "checkpoints"
    torch.hub.set_dir(old)


@pytest.mark.parametrize(
    ("cls", "weights", "file"),
    [
        (ResNet50, "IMAGENET1K_V2", "resnet50-11ad3fa6.pth"),
        (GoogLeNet, "IMAGENET1K_V1", "googlenet-1378be20.pth"),
    ],
)
def test_offline_weights_error_names_file_and_cache(offline_hub, cls, weights, file):
    with pytest.raises(WeightsNotFoundError) as err:
        cls(weights=weights)
    msg = str(err.value)
    assert str(offline_hub / file) in msg and "weights: null" in msg
    assert isinstance(err.value, FileNotFoundError)  # the CLI's one-line error path


def test_weights_from_the_hub_cache_load_offline(offline_hub):
    torch.manual_seed(1)
    reference = torchvision.models.GoogLeNet(aux_logits=True, init_weights=False)
    offline_hub.mkdir(parents=True)
    torch.save(reference.state_dict(), offline_hub / "googlenet-1378be20.pth")
    net = GoogLeNet(weights="IMAGENET1K_V1")
    assert torch.equal(net.net.conv1.conv.weight, reference.conv1.conv.weight)
    assert net.net.transform_input  # the ported TF weights expect their own input range


def test_unknown_weights_name():
    with pytest.raises(ValueError, match="IMAGENET1K_V2"):
        ResNet50(weights="IMAGENET21K")


@pytest.fixture(scope="module")
def cub_tree(tmp_path_factory):
    return make_tree("cub200", tmp_path_factory.mktemp("cub"), per_class=2)


@pytest.mark.parametrize(
    ("trunk", "size"),
    [
        ({"ResNet50": {"weights": None, "freeze_bn": True}}, 32),
        ({"GoogLeNet": {"weights": None, "freeze_bn": True}}, 32),
    ],
)
def test_one_training_iteration_through_the_runner(cub_tree, tmp_path, trunk, size):
    config = cfg_mod.validate(
        {
            "dataset": cub_tree.config(image_size=size),
            "model": {"trunk": trunk, "embedding_size": 8},
            "loss": "MultiSimilarityLoss",
            "sampler": {"MPerClassSampler": {"m": 2}},
            "batch_size": 4,
            "epochs": 1,
            "iterations_per_epoch": 1,
            "device": "cpu",
        }
    )
    prep = run.prepare(config, out=tmp_path / "run")
    assert prep.splits["train"][0][0].shape == (3, size, size)
    torch.manual_seed(0)
    models = run.build_models(config, prep.splits["train"][0][0])
    parts = run.build_components(config, prep.splits)
    optimizers = run.build_optimizers(config, models, parts["loss"])
    trunk_model = models["trunk"]
    bn_before = _bn_state(trunk_model)
    weights_before = {n: p.detach().clone() for n, p in trunk_model.named_parameters()}
    trainer = registry.build(
        "MetricLossOnly",
        "trainers",
        models=models,
        optimizers=optimizers,
        batch_size=config["batch_size"],
        loss_funcs={"metric_loss": parts["loss"]},
        mining_funcs={},
        dataset=prep.splits["train"],
        sampler=parts["sampler"],
        iterations_per_epoch=1,
        dataloader_num_workers=0,
        data_device=torch.device("cpu"),
        freeze_trunk_batchnorm=False,  # the trunk's own freeze_bn is what is tested
    )
    trainer.train(start_epoch=1, num_epochs=1)
    if isinstance(trunk_model, GoogLeNet):  # classifier, dropout and auxiliary heads removed
        assert trunk_model.net.aux1 is None and trunk_model.net.aux2 is None
        assert not any(isinstance(m, nn.Dropout) for m in trunk_model.modules())
    with torch.no_grad():
        out = trunk_model(prep.splits["train"][0][0][None])
    assert out.shape == (1, trunk_model.output_size)
    assert trunk_model.output_size == (1024 if isinstance(trunk_model, GoogLeNet) else 2048)
    assert torch.isfinite(torch.as_tensor(trainer.losses["total_loss"]))
    assert trunk_model.training  # PML set the trunk to train ...
    bn_after = _bn_state(trunk_model)  # ... and BN statistics and affine params did not move
    assert all(torch.equal(bn_before[k], bn_after[k]) for k in bn_before)
    moved = [n for n, p in trunk_model.named_parameters() if not torch.equal(p, weights_before[n])]
    assert moved and all("bn" not in n for n in moved)  # the convolutions took a step


def test_trunk_spec_validates_in_a_config():
    cfg_mod.validate(
        {
            "dataset": {"name": "cub200", "root": "data/CUB_200_2011"},
            "model": {"trunk": {"ResNet50": {"weights": None, "pooling": "avg+max"}}},
            "loss": "MultiSimilarityLoss",
        },
        check_data=False,
    )
    with pytest.raises(cfg_mod.ConfigError, match="frozen_bn"):
        cfg_mod.validate(
            {"model": {"trunk": {"GoogLeNet": {"frozen_bn": True}}}, "loss": "ContrastiveLoss"},
            check_data=False,
        )
