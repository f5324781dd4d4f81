"""RepresentativeSampler: batch layout, projections, hard class mining, state round trip."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.utils import common_functions as c_f

from pml_plugins.samplers import RepresentativeSampler


def make_labels(sizes: list[int], seed: int = 0) -> np.ndarray:
    """Labels 10, 20, 30, ... (not 0..C-1) with the given class sizes, shuffled."""
    labels = np.concatenate([np.full(n, 10 * (c + 1)) for c, n in enumerate(sizes)])
    return np.random.RandomState(seed).permutation(labels)


def class_position(sampler: RepresentativeSampler, label: int) -> int:
    return int(np.flatnonzero(sampler.classes == label)[0])


def check_batch(
    batch: list[int], labels: np.ndarray, k: int, m: int, reps: np.ndarray, sampler
) -> None:
    assert len(batch) == k * m
    batch_labels = labels[batch]
    classes, counts = np.unique(batch_labels, return_counts=True)
    assert len(classes) == k, "k distinct classes"
    assert (counts == m).all(), "m samples of each class"
    for label in classes:
        rep = reps[class_position(sampler, label)]
        assert labels[rep] == label, "a representative belongs to its class"
        assert rep in batch, "the representative of every class of the batch is in it"


@pytest.mark.parametrize("mining", ["random", "hard"])
def test_batches_hold_representatives_fixed_for_T_iterations(mining: str) -> None:
    labels = make_labels([6, 7, 5, 9, 6, 8, 5, 7])
    k, m, T = 3, 4, 5
    sampler = RepresentativeSampler(labels, k, m, T, mining=mining, seed=3)
    reps_of_projection: dict[int, np.ndarray] = {}
    for b in range(40):
        batch = sampler.next_batch()
        reps = sampler.representatives.copy()
        assert sampler.projection == b // T
        if mining == "hard":  # embeddings from the batch, as the trainer gives them
            sampler.update_representative_embeddings(batch, torch.randn(len(batch), 4))
        check_batch(batch, labels, k, m, reps, sampler)
        if sampler.projection in reps_of_projection:
            assert np.array_equal(reps_of_projection[sampler.projection], reps)
        else:
            reps_of_projection[sampler.projection] = reps
    assert len(reps_of_projection) == 8
    changed = [(reps_of_projection[p] != reps_of_projection[p + 1]).sum() for p in range(7)]
    # 8 classes of 5-9 samples: a redraw keeps every representative with prob. < 1e-5
    assert all(c > 0 for c in changed)


def test_dataloader_batches_and_length() -> None:
    labels = make_labels([6, 7, 5, 9, 6, 8])
    k, m = 2, 3
    sampler = RepresentativeSampler(labels, k, m, 4, mining="random", seed=0)
    assert len(sampler) == (len(labels) // (k * m)) * k * m
    dataset = torch.utils.data.TensorDataset(torch.arange(len(labels)))
    loader = torch.utils.data.DataLoader(dataset, batch_size=k * m, sampler=sampler)
    batches = [b[0].tolist() for b in loader]
    assert len(batches) == len(labels) // (k * m)
    for batch in batches:
        assert len(set(labels[batch].tolist())) == k
        projection, mask = sampler.batch_info(batch)
        rep_labels = labels[np.array(batch)[mask]]
        assert sorted(rep_labels.tolist()) == sorted(set(labels[batch].tolist()))
    long = RepresentativeSampler(labels, k, m, 4, length_before_new_iter=100, seed=0)
    assert len(long) == (100 // (k * m)) * k * m


def test_classes_smaller_than_m_are_filled_with_repeats() -> None:
    labels = make_labels([1, 2, 3, 8])
    k, m = 4, 5
    sampler = RepresentativeSampler(labels, k, m, 2, mining="hard", seed=1)
    for _ in range(6):
        batch = sampler.next_batch()
        reps = sampler.representatives
        check_batch(batch, labels, k, m, reps, sampler)
        singleton = reps[class_position(sampler, 10)]
        assert [i for i in batch if labels[i] == 10] == [singleton] * m
        two = [i for i in batch if labels[i] == 20]
        assert set(two) == set(np.flatnonzero(labels == 20).tolist())
        sampler.update_representative_embeddings(batch, torch.randn(len(batch), 3))


def test_invalid_arguments() -> None:
    labels = make_labels([3, 3])
    with pytest.raises(ValueError, match="classes_per_batch"):
        RepresentativeSampler(labels, 3, 2, 1)
    with pytest.raises(ValueError, match="mining"):
        RepresentativeSampler(labels, 2, 2, 1, mining="semi")
    with pytest.raises(ValueError, match="iterations_per_projection"):
        RepresentativeSampler(labels, 2, 2, 0)
    with pytest.raises(ValueError, match="batch_size"):
        RepresentativeSampler(labels, 2, 2, 1, batch_size=6)
    assert RepresentativeSampler(labels, 2, 2, 1, batch_size=4).batch_size == 4


def naive_nearest(points: dict[int, np.ndarray], seed: int, n: int) -> set[int]:
    """The n classes nearest to ``seed`` by Euclidean distance of L2-normalised points."""
    dist = []
    for c, x in points.items():
        if c == seed:
            continue
        a = points[seed] / math.sqrt(sum(v * v for v in points[seed]))
        b = x / math.sqrt(sum(v * v for v in x))
        dist.append((math.sqrt(sum((u - v) ** 2 for u, v in zip(a, b, strict=True))), c))
    return {c for _, c in sorted(dist)[:n]}


def test_hard_mining_picks_nearest_classes_of_the_seed() -> None:
    labels = make_labels([4] * 7)
    angles = [0, 15, 35, 90, 110, 200, 260]  # degrees, one class each
    k = 3
    sampler = RepresentativeSampler(labels, k, 2, iterations_per_projection=1000, seed=5)
    points = {
        c: np.array([math.cos(math.radians(a)), math.sin(math.radians(a))]) * (1 + c)
        for c, a in enumerate(angles)
    }
    emb = torch.tensor(np.stack([points[c] for c in range(7)]), dtype=torch.float32)
    sampler.update_representative_embeddings(sampler.representatives, emb)
    seeds = set()
    for _ in range(40):
        batch = sampler.next_batch()
        blocks = labels[batch].reshape(k, 2)
        seed = class_position(sampler, blocks[0, 0])
        seeds.add(seed)
        chosen = {class_position(sampler, lab) for lab in blocks[:, 0]}
        assert chosen == {seed} | naive_nearest(points, seed, k - 1)
    assert len(seeds) >= 5  # the seed class is drawn, not fixed


def test_hard_mining_with_a_similarity_and_unknown_classes() -> None:
    labels = make_labels([3] * 6)
    sampler = RepresentativeSampler(labels, 3, 1, 1000, distance=CosineSimilarity(), seed=2)
    known = np.array([0, 1, 2])
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1]])
    # items that are not representatives (here of classes 3-5) are ignored
    reps = set(sampler.representatives.tolist())
    others = [
        i for i in range(len(labels)) if i not in reps and class_position(sampler, labels[i]) >= 3
    ][:3]
    sampler.update_representative_embeddings(others, torch.full((3, 2), 5.0))
    assert not sampler.has_embedding.any()
    batch = np.concatenate([others, sampler.representatives[known]])
    sampler.update_representative_embeddings(batch, torch.cat([torch.full((3, 2), 5.0), emb]))
    assert sampler.has_embedding.tolist() == [True] * 3 + [False] * 3
    assert torch.equal(sampler.embeddings[known], emb)
    for _ in range(30):
        chosen = [class_position(sampler, lab) for lab in labels[sampler.next_batch()]]
        seed = chosen[0]
        if seed in (0, 2):  # most similar known class of 0 is 2 and of 2 is 0
            assert chosen[1] == 2 - seed
            assert chosen[2] == 1
        elif seed == 1:
            assert chosen[1] == 2  # cos(1, 2) > cos(1, 0)
            assert chosen[2] == 0
        else:  # a seed without an embedding gets random classes
            assert len(set(chosen)) == 3


def test_redraw_forgets_embeddings_unless_kept() -> None:
    labels = make_labels([4] * 4)
    for keep in (False, True):
        sampler = RepresentativeSampler(
            labels, 2, 2, 2, keep_embeddings_across_projections=keep, seed=0
        )
        sampler.update_representative_embeddings(sampler.representatives, torch.randn(4, 3))
        assert sampler.has_embedding.all()
        for _ in range(3):
            sampler.next_batch()
        assert sampler.projection == 1
        assert sampler.has_embedding.all() == keep


def roundtrip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("mining", ["random", "hard"])
def test_state_dict_round_trip_continues_the_same_stream(mining: str) -> None:
    labels = make_labels([5, 6, 7, 5, 6, 7])
    a = RepresentativeSampler(labels, 3, 3, 4, mining=mining, seed=11)
    for _ in range(6):
        batch = a.next_batch()
        a.update_representative_embeddings(batch, torch.randn(len(batch), 4))
    state = roundtrip(a.state_dict())
    b = RepresentativeSampler(labels, 3, 3, 4, mining=mining, seed=99)
    b.load_state_dict(state)
    assert (b.projection, b.iteration) == (a.projection, a.iteration)
    assert np.array_equal(b.representatives, a.representatives)
    assert torch.equal(b.embeddings, a.embeddings)
    for _ in range(10):  # crosses two redraws
        batch = a.next_batch()
        assert b.next_batch() == batch
        emb = torch.randn(len(batch), 4)
        a.update_representative_embeddings(batch, emb)
        b.update_representative_embeddings(batch, emb)
    with pytest.raises(ValueError, match="different label set"):
        RepresentativeSampler(make_labels([5, 6]), 2, 2, 4).load_state_dict(state)


def test_pml_rng_is_used_without_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    labels = make_labels([5, 6, 7, 5])
    streams = []
    for _ in range(2):
        monkeypatch.setattr(c_f, "NUMPY_RANDOM", np.random.RandomState(123))
        s = RepresentativeSampler(labels, 2, 3, 2, mining="random")
        streams.append([s.next_batch() for _ in range(5)])
    assert streams[0] == streams[1]
    # without a seed the state restores the projection (not PML's global RNG)
    state = roundtrip(s.state_dict())
    assert state["rng"] is None
    t = RepresentativeSampler(labels, 2, 3, 2, mining="random")
    t.load_state_dict(state)
    assert t.projection == s.projection and np.array_equal(t.representatives, s.representatives)


def test_batch_info_of_earlier_batches_and_unknown_batches() -> None:
    labels = make_labels([4] * 5)
    s = RepresentativeSampler(labels, 2, 2, 2, mining="random", seed=4)
    batches = [s.next_batch() for _ in range(5)]
    reps = s.representatives
    for b, batch in enumerate(batches):  # as a prefetching DataLoader would ask
        projection, mask = s.batch_info(torch.tensor(batch))
        assert projection == b // 2
        assert mask.tolist() == [True, False, True, False]
    unknown = [int(reps[0]), int(reps[0]), int(reps[1])]
    projection, mask = s.batch_info(unknown)
    assert projection == s.projection
    assert mask.tolist() == [True, False, True]  # a repeated representative counts once
