"""AlternatingProjections: proximal term, projections, miner wiring, save/resume."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from pytorch_metric_learning.losses import ContrastiveLoss, MultiSimilarityLoss
from pytorch_metric_learning.miners import MultiSimilarityMiner
from pytorch_metric_learning.samplers import MPerClassSampler
from pytorch_metric_learning.trainers import MetricLossOnly
from pytorch_metric_learning.utils import common_functions as c_f

from pml_plugins.miners import RepresentativeMiner
from pml_plugins.samplers import RepresentativeSampler
from pml_plugins.trainers import AlternatingProjections
from pml_plugins.trainers.proximal_term import ProximalTerm

GRID = Path(__file__).resolve().parents[2] / "config" / "config.yaml"
N_CLASSES, PER_CLASS, DIM = 6, 8, 5
K, M = 3, 4


def dataset(seed: int = 0) -> torch.utils.data.TensorDataset:
    """Six Gaussian blobs in 5-D, labels 0..5."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(N_CLASSES).repeat_interleave(PER_CLASS)
    centers = 3 * torch.randn(N_CLASSES, DIM, generator=g)
    x = centers[labels] + torch.randn(len(labels), DIM, generator=g)
    return torch.utils.data.TensorDataset(x, labels)


def models(seed: int = 0) -> dict[str, torch.nn.Module]:
    torch.manual_seed(seed)
    return {"trunk": torch.nn.Linear(DIM, 6), "embedder": torch.nn.Linear(6, 3)}


def optimizers(ms: dict[str, torch.nn.Module], lr: float = 0.05) -> dict:
    return {f"{k}_optimizer": torch.optim.SGD(v.parameters(), lr=lr) for k, v in ms.items()}


def make_trainer(
    ds=None,
    ms=None,
    T: int = 3,
    mining: str = "hard",
    seed: int = 1,
    loss=None,
    hook=None,
    **kwargs,
) -> AlternatingProjections:
    ds = dataset() if ds is None else ds
    ms = models() if ms is None else ms
    sampler = RepresentativeSampler(ds.tensors[1], K, M, T, mining=mining, seed=seed)
    kwargs.setdefault("dataloader_num_workers", 0)
    return AlternatingProjections(
        models=ms,
        optimizers=optimizers(ms),
        batch_size=K * M,
        loss_funcs={"metric_loss": ContrastiveLoss() if loss is None else loss},
        dataset=ds,
        sampler=sampler,
        data_device=torch.device("cpu"),
        end_of_iteration_hook=hook,
        **kwargs,
    )


def params(trainer) -> list[torch.Tensor]:
    return [
        p.detach().clone() for m in ("trunk", "embedder") for p in trainer.models[m].parameters()
    ]


def test_proximal_term_value_and_gradient() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)).double()
    lam = 0.7
    term = ProximalTerm(net.named_parameters(), lam)
    term.snapshot(0)
    anchors = [p.detach().clone() for p in net.parameters()]
    value = term()
    assert value.item() == 0.0  # zero right after a snapshot
    value.backward()
    assert all(p.grad is None or (p.grad == 0).all() for p in net.parameters())
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
    net.zero_grad()
    value = term()
    value.backward()
    naive = 0.0
    for p, a in zip(net.parameters(), anchors, strict=True):
        for x, y in zip(p.detach().flatten().tolist(), a.flatten().tolist(), strict=True):
            naive += (x - y) ** 2
    assert value.item() == pytest.approx(lam / 2 * naive, rel=1e-12)
    assert term.proximal_value == pytest.approx(value.item())
    for p, a in zip(net.parameters(), anchors, strict=True):
        torch.testing.assert_close(p.grad, lam * (p.detach() - a))
    with pytest.raises(ValueError):
        ProximalTerm(net.named_parameters(), -1.0)


def test_training_snapshots_theta_k_at_each_redraw() -> None:
    T, lam = 3, 0.5
    record = {"after": [], "proximal": [], "projection": [], "theta_k": []}

    def hook(trainer):
        record["after"].append(params(trainer))
        record["proximal"].append(float(trainer.losses["proximal_loss"].detach()))
        record["projection"].append(trainer.proximal_term.projection)
        record["theta_k"].append([a.clone() for a in trainer.proximal_term.anchors()])

    trainer = make_trainer(T=T, hook=hook, proximal_weight=lam, iterations_per_epoch=4)
    initial = params(trainer)
    trainer.train(1, 2)  # 8 iterations, crosses projections 0, 1, 2
    assert record["projection"] == [i // T for i in range(8)]
    for i in range(8):
        start = (i // T) * T
        before_start = initial if start == 0 else record["after"][start - 1]
        for got, want in zip(record["theta_k"][i], before_start, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        if i % T == 0:
            assert record["proximal"][i] == 0.0  # zero right after a redraw
        else:
            assert record["proximal"][i] > 0.0
    assert trainer.sampler.projection == 2
    assert "proximal_loss" in trainer.loss_tracker.losses


def test_trainer_gradient_is_base_gradient_plus_lambda_theta_minus_theta_k() -> None:
    lam = 0.3
    trainer = make_trainer(T=100, proximal_weight=lam, iterations_per_epoch=3)
    trainer.train(1, 1)  # parameters move away from theta_k
    data, labels = trainer.get_batch()
    trainer.zero_losses()
    trainer.zero_grad()
    trainer.calculate_loss((data, labels))
    trainer.loss_tracker.update(trainer.loss_weights)
    trainer.backward()
    total = [p.grad.clone() for m in ("trunk", "embedder") for p in trainer.models[m].parameters()]
    trainer.zero_grad()
    emb = trainer.compute_embeddings(data)
    trainer.loss_funcs["metric_loss"](emb, labels).backward()
    base = [p.grad.clone() for m in ("trunk", "embedder") for p in trainer.models[m].parameters()]
    anchors = trainer.proximal_term.anchors()
    current = params(trainer)
    assert any((c != a).any() for c, a in zip(current, anchors, strict=True))
    for t, b, c, a in zip(total, base, current, anchors, strict=True):
        torch.testing.assert_close(t - b, lam * (c - a), rtol=1e-5, atol=1e-7)


def test_zero_lambda_is_the_base_loss_with_the_sampler() -> None:
    ds = dataset()
    ap = make_trainer(ds=ds, ms=models(3), mining="random", seed=7, proximal_weight=0.0)
    ap.train(1, 2)
    ms = models(3)
    base = MetricLossOnly(
        models=ms,
        optimizers=optimizers(ms),
        batch_size=K * M,
        loss_funcs={"metric_loss": ContrastiveLoss()},
        dataset=ds,
        sampler=RepresentativeSampler(ds.tensors[1], K, M, 3, mining="random", seed=7),
        dataloader_num_workers=0,
        data_device=torch.device("cpu"),
    )
    base.train(1, 2)
    for a, b in zip(params(ap), params(base), strict=True):
        torch.testing.assert_close(a, b)
    assert ap.proximal_term.proximal_value == 0.0


def test_representative_anchors_only_mines_representative_tuples() -> None:
    seen = []

    def hook(trainer):
        miner = trainer.mining_funcs["tuple_miner"]
        idx = trainer.batch_indices
        mask = trainer.representative_mask
        assert torch.equal(miner.representative_mask, mask)
        reps = trainer.sampler.representatives
        labels = trainer.dataset.tensors[1]
        rep_items = idx[mask].numpy()
        assert (reps[labels[rep_items].numpy()] == rep_items).all()
        assert sorted(labels[rep_items].tolist()) == sorted(set(labels[idx].tolist()))
        emb = trainer.compute_embeddings(trainer.dataset.tensors[0][idx])
        a1, _, a2, _ = miner(emb, labels[idx])
        assert mask[a1].all() and mask[a2].all() and len(a1) > 0
        seen.append(len(a2))

    inner = MultiSimilarityMiner(epsilon=10.0)  # keeps every pair
    trainer = make_trainer(
        T=2,
        hook=hook,
        representative_anchors_only=True,
        mining_funcs={"tuple_miner": inner},
        loss=MultiSimilarityLoss(),
        iterations_per_epoch=5,
    )
    miner = trainer.mining_funcs["tuple_miner"]
    assert isinstance(miner, RepresentativeMiner) and miner.inner_miner is inner
    trainer.train(1, 1)
    assert len(seen) == 5
    assert all(n == K * (K - 1) * M for n in seen)  # each representative vs other classes


def roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_save_and_load_restore_theta_k_and_representatives(tmp_path) -> None:
    ds = dataset()
    a = make_trainer(ds=ds, T=4, proximal_weight=0.2, iterations_per_epoch=6)
    a.train(1, 1)  # projection 1, theta_k taken at iteration 4, embeddings refreshed
    assert a.proximal_term.projection == 1
    # the folder layout PML's HookContainer uses for models and loss_funcs
    for group in (a.models, a.loss_funcs):
        c_f.save_dict_of_models(group, "1", str(tmp_path))
    b = make_trainer(ds=ds, ms=models(seed=5), T=4, seed=99, proximal_weight=0.2)
    for group in (b.models, b.loss_funcs):
        c_f.load_dict_of_models(group, "1", str(tmp_path), torch.device("cpu"))
    for x, y in zip(params(a), params(b), strict=True):
        assert torch.equal(x, y)
    for x, y in zip(a.proximal_term.anchors(), b.proximal_term.anchors(), strict=True):
        assert torch.equal(x, y)
    assert not all(  # theta_k is not just the weights
        torch.equal(x, y) for x, y in zip(a.proximal_term.anchors(), params(a), strict=True)
    )
    sa, sb = a.sampler, b.sampler
    assert b.proximal_term.projection == 1
    assert (sb.projection, sb.iteration, sb.batches_in_projection) == (1, 6, 2)
    assert np.array_equal(sa.representatives, sb.representatives)
    assert torch.equal(sa.embeddings, sb.embeddings)
    assert np.array_equal(sa.has_embedding, sb.has_embedding)

    c = make_trainer(ds=ds, ms=models(seed=6), T=4, seed=98, proximal_weight=0.2)
    c.load_state_dict(roundtrip(a.state_dict()))
    assert np.array_equal(c.sampler.representatives, sa.representatives)
    for x, y in zip(a.proximal_term.anchors(), c.proximal_term.anchors(), strict=True):
        assert torch.equal(x, y)
    # the resumed samplers continue the same stream, across the next redraw
    for _ in range(3):
        batch = sa.next_batch()
        assert sb.next_batch() == batch and c.sampler.next_batch() == batch


def test_projection_tracking_with_dataloader_workers() -> None:
    """Prefetching workers run ahead of the trainer; batch_info keeps theta_k exact."""
    T = 2
    record = []

    def hook(trainer):
        record.append((trainer.proximal_term.projection, trainer.sampler.projection))

    trainer = make_trainer(T=T, hook=hook, dataloader_num_workers=1, iterations_per_epoch=4)
    trainer.train(1, 1)
    assert [p for p, _ in record] == [i // T for i in range(4)]
    assert record[0][1] > record[0][0]  # the sampler was ahead: prefetching happened


def test_invalid_setups() -> None:
    ds = dataset()
    ms = models()
    common = dict(
        models=ms,
        optimizers=optimizers(ms),
        loss_funcs={"metric_loss": ContrastiveLoss()},
        dataset=ds,
        data_device=torch.device("cpu"),
    )
    with pytest.raises(ValueError, match="RepresentativeSampler"):
        AlternatingProjections(
            batch_size=K * M, sampler=MPerClassSampler(ds.tensors[1], M), **common
        )
    sampler = RepresentativeSampler(ds.tensors[1], K, M, 2)
    with pytest.raises(ValueError, match="batch_size"):
        AlternatingProjections(batch_size=K * M + 1, sampler=sampler, **common)
    with pytest.raises(ValueError, match="subset_batch_miner"):
        AlternatingProjections(
            batch_size=K * M,
            sampler=sampler,
            mining_funcs={"subset_batch_miner": MultiSimilarityMiner()},
            **common,
        )


def test_record_keeper_logs_proximal_value_and_projection(tmp_path) -> None:
    import record_keeper
    from pytorch_metric_learning.utils import logging_presets

    keeper = record_keeper.RecordKeeper(
        record_writer=record_keeper.RecordWriter(folder=str(tmp_path)),
        attributes_to_search_for=c_f.list_of_recordable_attributes_list_names(),
    )
    hooks = logging_presets.HookContainer(keeper, log_freq=1)
    trainer = make_trainer(
        T=2, hook=hooks.end_of_iteration_hook, proximal_weight=0.4, iterations_per_epoch=4
    )
    trainer.train(1, 1)
    groups = keeper.record_writer.records
    proximal = next(v for k, v in groups.items() if k.startswith("proximal_loss"))
    assert [it for it, _ in proximal["projection"].items()] == [0, 1, 2, 3]
    assert list(proximal["projection"].values()) == [0, 0, 1, 1]
    values = list(proximal["proximal_value"].values())
    assert values[0] == 0.0 and values[2] == 0.0 and values[1] > 0 and values[3] > 0
    history = list(groups["loss_histories"]["proximal_loss"].values())
    assert history == pytest.approx(values)
    metric = list(groups["loss_histories"]["metric_loss"].values())
    share = list(proximal["proximal_share"].values())
    assert share == pytest.approx(
        [p / (m + p) if m + p > 0 else 0.0 for m, p in zip(metric, values, strict=True)]
    )
    assert share[1] > 0 and share[3] > 0
    distance = list(proximal["squared_distance"].values())
    assert distance == pytest.approx([2 * v / 0.4 for v in values])
    # theta_k is not walked by record-keeper (it would copy every parameter at each log)
    assert not any("theta" in k or "anchor" in k for g in groups.values() for k in g)
    assert not keeper.record_writer.records_that_are_lists


def naive_squared_distance(trainer) -> float:
    """``||theta - theta_k||^2`` by a Python loop over every entry, in float64."""
    total = 0.0
    for p, a in zip(params(trainer), trainer.proximal_term.anchors(), strict=True):
        for x, y in zip(p.double().flatten().tolist(), a.double().flatten().tolist(), strict=True):
            total += (x - y) ** 2
    return total


def test_recorded_distance_and_share_follow_the_documented_equation() -> None:
    lam, weights = 0.3, {"metric_loss": 2.0, "proximal_loss": 0.5}
    trainer = make_trainer(T=100, proximal_weight=lam, loss_weights=weights, iterations_per_epoch=3)
    trainer.train(1, 1)  # the parameters move away from theta_k
    trainer.zero_losses()
    trainer.calculate_loss(trainer.get_batch())
    term = trainer.proximal_term
    d2 = naive_squared_distance(trainer)
    assert d2 > 0
    assert term.squared_distance == pytest.approx(d2, rel=1e-5)
    proximal = lam / 2 * d2
    assert term.proximal_value == pytest.approx(proximal, rel=1e-5)
    base = weights["metric_loss"] * float(trainer.losses["metric_loss"])
    assert base > 0
    want = weights["proximal_loss"] * proximal / (base + weights["proximal_loss"] * proximal)
    assert term.proximal_share == pytest.approx(want, rel=1e-5)
    for g, p, a in zip(term.gradient(), params(trainer), term.anchors(), strict=True):
        torch.testing.assert_close(g, lam * (p - a))


def test_share_is_bounded_and_zero_without_the_term() -> None:
    term = ProximalTerm(torch.nn.Linear(2, 2).named_parameters(), 1.0)
    with torch.no_grad():
        for p in term.tracked_parameters():
            p.add_(1.0)
    term()
    assert term.squared_distance == pytest.approx(6.0)
    assert term.record_share(0.0) == 1.0  # a base loss of 0: all of the loss is the term
    assert term.record_share(-3.0) == pytest.approx(3 / 6)  # |negative| losses count
    assert term.record_share(3.0, loss_weight=0.0) == 0.0
    off = ProximalTerm(torch.nn.Linear(2, 2).named_parameters(), 0.0)
    with torch.no_grad():
        for p in off.tracked_parameters():
            p.add_(1.0)
    assert off().item() == 0.0 and off.proximal_value == 0.0
    assert off.squared_distance == pytest.approx(6.0)  # still recorded with lambda = 0
    assert off.record_share(1.0) == 0.0


def default_grid_setting():
    """The AlternatingProjections row of the default grid (64-d, seed 0): config and parts."""
    import grid

    from pml_plugins.experiment import config as cfg_mod
    from pml_plugins.experiment import data as data_mod
    from pml_plugins.experiment import run as run_mod

    cells = grid.expand(yaml.safe_load(GRID.read_text()))
    config = cfg_mod.validate(
        cells[grid.cell_path("mnist_subset", "AlternatingProjections", 64, 0)]
    )
    run_mod.seed_everything(config["seed"])
    splits = data_mod.load_splits(config["dataset"])
    ms = run_mod.build_models(config, splits["train"][0][0])
    parts = run_mod.build_components(config, splits)
    return config, splits, ms, parts, run_mod.build_optimizers(config, ms, parts["loss"])


def test_default_weight_is_the_grid_rows_weight() -> None:
    import inspect

    default = inspect.signature(AlternatingProjections).parameters["proximal_weight"].default
    grid_row = yaml.safe_load(GRID.read_text())["losses"]["AlternatingProjections"]
    assert grid_row["trainer"]["AlternatingProjections"]["proximal_weight"] == default
    ap_grid = yaml.safe_load((GRID.parent / "ap.yaml").read_text())["losses"]
    weights = [
        row["trainer"]["AlternatingProjections"]["proximal_weight"]
        for row in ap_grid.values()
        if "trainer" in row
    ]
    assert weights and all(w == default for w in weights)


def test_default_weight_is_a_non_negligible_part_of_the_objective(one_thread) -> None:
    """In the default grid's setting, one projection (T iterations) with the trainer's
    default lambda: at its last batch the term is at least 1% of the total loss and its
    gradient at least 10% of the base loss's gradient (norms). With the old default,
    2e-4, the term was about 1e-5 of the loss and its gradient about 1e-4 of the base
    loss's gradient."""
    config, splits, ms, parts, opts = default_grid_setting()
    T = parts["sampler"].iterations_per_projection
    record = []

    def hook(trainer):
        record.append(trainer.proximal_term.proximal_share)

    trainer = AlternatingProjections(
        models=ms,
        optimizers=opts,
        batch_size=config["batch_size"],
        loss_funcs={"metric_loss": parts["loss"]},
        mining_funcs={"tuple_miner": parts["miner"]},
        dataset=splits["train"],
        sampler=parts["sampler"],
        iterations_per_epoch=T - 1,
        dataloader_num_workers=0,
        data_device=torch.device("cpu"),
        end_of_iteration_hook=hook,
    )
    trainer.train(1, 1)
    assert record[0] == 0.0  # the first batch of the projection: theta = theta_k
    # the projection's last batch, by hand: its share and the gradients of both parts
    trainer.zero_losses()
    trainer.zero_grad()
    trainer.calculate_loss(trainer.get_batch())
    term = trainer.proximal_term
    assert term.projection == 0 and trainer.sampler.batches_in_projection == T
    assert term.proximal_share >= 0.01
    trainer.losses["metric_loss"].backward()
    base = sum(float(p.grad.pow(2).sum()) for p in term.tracked_parameters())
    prox = sum(float(g.pow(2).sum()) for g in term.gradient())
    assert base > 0 and (prox / base) ** 0.5 >= 0.1
