"""MetrixTrainer: feature and input mixing through PML's trainer, on sklearn's digits."""

from __future__ import annotations

import math

import pytest
import torch
from pytorch_metric_learning.losses import MultiSimilarityLoss
from pytorch_metric_learning.samplers import MPerClassSampler
from pytorch_metric_learning.utils import common_functions as c_f
from sklearn.datasets import load_digits

from pml_plugins.losses import MetrixLoss
from pml_plugins.trainers import MetrixTrainer

MS = {"alpha": 17.97, "beta": 75.66, "base": 0.77}
N_CLASSES = 5


pytestmark = pytest.mark.usefixtures("one_thread")


def digits(n_per_class: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 1, 8, 8) images in [0, 1] and labels 0..4, n_per_class of each."""
    x, y = load_digits(return_X_y=True)
    keep = [i for c in range(N_CLASSES) for i in (y == c).nonzero()[0][:n_per_class]]
    images = torch.tensor(x[keep], dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    return images, torch.tensor(y[keep], dtype=torch.long)


class TinyCNN(torch.nn.Module):
    """A trunk that returns pooled vectors (B, 32) and does not expose its maps."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = torch.relu(self.conv(x))
        avg = torch.nn.functional.adaptive_avg_pool2d(maps, 2)
        return (avg + torch.nn.functional.adaptive_max_pool2d(maps, 2)).flatten(1)


class TinyMapCNN(TinyCNN):
    """The same trunk as a MapTrunk: average + max pooling of its maps, as Metrix's ResNet."""

    def feature_maps(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))

    def pool(self, maps: torch.Tensor) -> torch.Tensor:
        avg = torch.nn.functional.adaptive_avg_pool2d(maps, 2)
        return (avg + torch.nn.functional.adaptive_max_pool2d(maps, 2)).flatten(1)

    def forward(self, x: torch.Tensor, pooled: bool = True) -> torch.Tensor:
        maps = self.feature_maps(x)
        return self.pool(maps) if pooled else maps


def make_trainer(
    loss: MetrixLoss,
    iterations: int = 1,
    batch_size: int = 20,
    m: int = 4,
    trunk: torch.nn.Module | None = None,
    **kwargs,
):
    torch.manual_seed(0)
    c_f.NUMPY_RANDOM.seed(0)  # MPerClassSampler's batches
    images, labels = digits()
    trunk = TinyMapCNN() if trunk is None else trunk
    # a non-linear embedder, so that mixing features and mixing embeddings differ
    embedder = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8))
    models = {"trunk": trunk, "embedder": embedder}
    optimizers = {
        f"{k}_optimizer": torch.optim.Adam(v.parameters(), lr=1e-2) for k, v in models.items()
    }
    if list(loss.parameters()):
        optimizers["metric_loss_optimizer"] = torch.optim.Adam(loss.parameters(), lr=0.1)
    sampler = MPerClassSampler(
        labels, m=m, batch_size=batch_size, length_before_new_iter=len(labels)
    )
    trainer = MetrixTrainer(
        models=models,
        optimizers=optimizers,
        batch_size=batch_size,
        loss_funcs={"metric_loss": loss},
        dataset=torch.utils.data.TensorDataset(images, labels),
        sampler=sampler,
        iterations_per_epoch=iterations,
        data_device=torch.device("cpu"),
        dataloader_num_workers=0,
        **kwargs,
    )
    return trainer, images, labels


def objective(trainer: MetrixTrainer, images: torch.Tensor, labels: torch.Tensor) -> float:
    """The trainer's own loss on a fixed batch, without a parameter update."""
    with torch.no_grad():
        trainer.calculate_loss((images, labels))
    return float(trainer.losses["metric_loss"])


# ---------------------------------------------------------------- naive reference
def cos(u: list[float], v: list[float]) -> float:
    nu = math.sqrt(sum(a * a for a in u))
    nv = math.sqrt(sum(b * b for b in v))
    return sum(a * b for a, b in zip(u, v, strict=True)) / (nu * nv)


def naive_ms(per_anchor: list[tuple[list[float], list[tuple[list[float], float]]]]) -> float:
    total = 0.0
    for a_vec, cands in per_anchor:
        pos = sum(y * math.exp(-MS["alpha"] * (cos(a_vec, v) - MS["base"])) for v, y in cands)
        neg = sum((1 - y) * math.exp(MS["beta"] * (cos(a_vec, v) - MS["base"])) for v, y in cands)
        total += math.log(1 + pos) / MS["alpha"] + math.log(1 + neg) / MS["beta"]
    return total / len(per_anchor)


def naive_objective(trainer, images, labels, lam, mode, mix_maps=True, positives=None):
    """Clean MS + 0.4 x mixed MS, the mixed points built one by one: feature mode mixes
    each anchor's first positive (or itself) with each of its negatives, at the trunk's maps
    (``mix_maps``) or at its pooled output; input mode mixes each positive (or the anchor)
    with the anchor's hardest negative."""
    trunk, embedder = trainer.models["trunk"], trainer.models["embedder"]
    L = labels.tolist()
    positives = positives or ("first" if mode == "feature" else "all")
    with torch.no_grad():
        feats = trunk(images)
        emb = embedder(feats)
        E = emb.tolist()

        def mixed_embedding(i: int, j: int) -> list[float]:
            xi, xj = images[i : i + 1], images[j : j + 1]
            if mode == "input":
                mixed = trunk(lam * xi + (1 - lam) * xj)
            elif mix_maps:
                mixed = trunk.pool(
                    lam * trunk.feature_maps(xi) + (1 - lam) * trunk.feature_maps(xj)
                )
            else:
                mixed = lam * feats[i : i + 1] + (1 - lam) * feats[j : j + 1]
            return embedder(mixed)[0].tolist()

        def hardest(i: int) -> int:
            return max((n for n in range(len(L)) if L[n] != L[i]), key=lambda n: cos(E[i], E[n]))

        clean_in, mixed_in = [], []
        for a in range(len(L)):
            clean_in.append((E[a], [(E[j], float(L[j] == L[a])) for j in range(len(L)) if j != a]))
            pos = [p for p in range(len(L)) if p != a and L[p] == L[a]]
            neg = [n for n in range(len(L)) if L[n] != L[a]]
            sources = (pos[:1] if positives == "first" else pos) or [a]
            negatives = neg if mode == "feature" else [hardest(a)]
            pairs = [(s, n) for s in sources for n in negatives]
            mixed_in.append((E[a], [(mixed_embedding(f, s), lam) for f, s in pairs]))
    return naive_ms(clean_in) + 0.4 * naive_ms(mixed_in)


# ---------------------------------------------------------------- tests
BATCH = torch.tensor([0, 1, 40, 41, 42, 80, 120, 160, 161])  # classes 0,0,1,1,1,2,3,4,4


@pytest.mark.parametrize("mode", ["feature", "input"])
def test_one_iteration_matches_mixing_by_hand(mode):
    loss = MetrixLoss("multi_similarity", mode=mode, lam=0.3, miner=None)
    trainer, images, labels = make_trainer(loss)
    with torch.no_grad():  # make the embedder clearly non-linear on these features
        trainer.models["embedder"][0].weight.mul_(20)
    batch = (images[BATCH], labels[BATCH])
    want = naive_objective(trainer, *batch, lam=0.3, mode=mode)
    assert objective(trainer, *batch) == pytest.approx(want, rel=1e-5)


def test_feature_mode_mixes_maps_before_pooling():
    """A MapTrunk's maps are mixed, then pooled (the authors' layer4 mixing): with max
    pooling this differs from mixing the pooled vectors, and the trainer gives the former."""
    loss = MetrixLoss("multi_similarity", mode="feature", lam=0.5, miner=None)
    trainer, images, labels = make_trainer(loss)
    with torch.no_grad():
        trainer.models["embedder"][0].weight.mul_(20)
    batch = (images[BATCH], labels[BATCH])
    maps = naive_objective(trainer, *batch, lam=0.5, mode="feature")
    pooled = naive_objective(trainer, *batch, lam=0.5, mode="feature", mix_maps=False)
    assert abs(maps - pooled) > 1e-3 * abs(maps)  # the two can be told apart
    assert objective(trainer, *batch) == pytest.approx(maps, rel=1e-5)


def test_feature_mode_mixes_the_output_of_other_trunks():
    """A trunk without feature_maps/pool: its output is mixed (the documented fallback)."""
    loss = MetrixLoss("multi_similarity", mode="feature", lam=0.5, miner=None)
    trainer, images, labels = make_trainer(loss, trunk=TinyCNN())
    with torch.no_grad():
        trainer.models["embedder"][0].weight.mul_(20)
    batch = (images[BATCH], labels[BATCH])
    want = naive_objective(trainer, *batch, lam=0.5, mode="feature", mix_maps=False)
    assert objective(trainer, *batch) == pytest.approx(want, rel=1e-5)


def test_feature_mode_looks_through_a_data_parallel_wrapper():
    loss = MetrixLoss("multi_similarity", mode="feature", lam=0.5, miner=None)
    trainer, images, labels = make_trainer(loss)
    batch = (images[BATCH], labels[BATCH])
    want = objective(trainer, *batch)
    trainer.models["trunk"] = torch.nn.DataParallel(trainer.models["trunk"])
    assert trainer.map_trunk() is trainer.models["trunk"].module
    assert objective(trainer, *batch) == pytest.approx(want, rel=1e-6)


def test_mixing_pairs_come_from_the_tuple_miner():
    """With a tuple_miner, the mixes are built from its pairs (mine_mixed, the default)."""
    from pytorch_metric_learning.miners import MultiSimilarityMiner

    miner = MultiSimilarityMiner(epsilon=0.05)
    mined = MetrixLoss("multi_similarity", mode="feature", lam=0.5, miner=None)
    trainer, images, labels = make_trainer(mined, mining_funcs={"tuple_miner": miner})
    batch = (images[BATCH], labels[BATCH])
    seen = []
    original = mined.compute_mixed_loss

    def spy(embeddings, labels, mixed_emb, pairs, lam):
        seen.append((embeddings.detach(), pairs))
        return original(embeddings, labels, mixed_emb, pairs, lam)

    mined.compute_mixed_loss = spy
    objective(trainer, *batch)
    embeddings, pairs = seen[0]
    a1, p, a2, n = miner(embeddings, batch[1])
    rows, seconds = pairs.entries
    anchors = pairs.anchors[rows]
    negative = torch.zeros(len(BATCH), len(BATCH), dtype=torch.bool)
    negative[a2, n] = True
    assert negative[anchors, seconds].all()  # every mix uses a mined negative of its anchor
    assert int(pairs.seen.sum()) < int((batch[1][:, None] != batch[1][None, :]).sum())


@pytest.mark.parametrize(
    "mode, loss_name",
    [
        ("feature", "multi_similarity"),
        ("input", "multi_similarity"),
        ("feature", "contrastive"),
        ("input", "proxy_anchor"),
    ],
)
def test_training_decreases_the_loss(mode, loss_name):
    kw = {"num_classes": N_CLASSES, "embedding_size": 8} if loss_name == "proxy_anchor" else {}
    loss = MetrixLoss(loss_name, mode=mode, lam=0.4, miner=None, **kw)
    trainer, images, labels = make_trainer(loss, iterations=60)
    fixed = (images[::5], labels[::5])  # 8 per class
    before = objective(trainer, *fixed)
    trainer.train(num_epochs=1)
    after = objective(trainer, *fixed)
    assert math.isfinite(after) and after < 0.9 * before


@pytest.mark.parametrize("mode, trunk_calls", [("feature", 1), ("input", 2)])
def test_trunk_runs_once_per_iteration(mode, trunk_calls):
    loss = MetrixLoss("multi_similarity", mode=mode)  # lambda sampled, default miner
    trainer, _, _ = make_trainer(loss, iterations=3)
    calls = []
    trainer.models["trunk"].register_forward_hook(lambda *_: calls.append(1))
    trainer.train(num_epochs=1)
    assert len(calls) == 3 * trunk_calls


@pytest.mark.parametrize("mode", ["feature", "input"])
@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_extreme_lambda_is_finite(mode, lam):
    loss = MetrixLoss("contrastive", mode=mode, lam=lam)
    trainer, images, labels = make_trainer(loss)
    trainer.calculate_loss((images[::7], labels[::7]))
    total = trainer.losses["metric_loss"]
    assert torch.isfinite(total)
    total.backward()
    for p in trainer.models["trunk"].parameters():
        assert torch.isfinite(p.grad).all()


@pytest.mark.parametrize("mode", ["feature", "input"])
def test_single_class_batch(mode):
    """Nothing to mix: the clean loss alone, finite, no empty forward pass."""
    loss = MetrixLoss("multi_similarity", mode=mode, lam=0.5)
    trainer, images, labels = make_trainer(loss)
    trainer.calculate_loss((images[:6], labels[:6]))
    assert float(trainer.losses["metric_loss"]) == 0.0


def test_embed_mode_is_metric_loss_only():
    loss = MetrixLoss("multi_similarity", mode="embed", lam=0.6)
    trainer, images, labels = make_trainer(loss)
    x, y = images[::9], labels[::9]
    got = objective(trainer, x, y)
    with torch.no_grad():
        want = loss(trainer.models["embedder"](trainer.models["trunk"](x)), y)
    assert got == pytest.approx(float(want))


def test_needs_a_metrix_loss():
    with pytest.raises(TypeError, match="MetrixLoss"):
        make_trainer(MultiSimilarityLoss())
