"""Batches built around one representative sample per class (Alternating Projections)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from pytorch_metric_learning.distances import BaseDistance, LpDistance
from pytorch_metric_learning.utils import common_functions as c_f
from torch.utils.data import Sampler

#: how many yielded batches :meth:`RepresentativeSampler.batch_info` remembers
BATCH_LOG_SIZE = 1024


def _as_indices(indices: torch.Tensor | np.ndarray | Sequence[int]) -> np.ndarray:
    """Dataset indices as a flat int64 array."""
    return np.asarray(torch.as_tensor(indices).cpu(), dtype=np.int64).reshape(-1)


class RepresentativeSampler(Sampler[int]):
    """Yields batches of ``k`` classes x ``m`` samples that hold each class's representative.

    From "Deep Metric Learning with Alternating Projections onto Feasible Sets", O. Can,
    Y. Z. Gürbüz, A. A. Alatan, ICIP 2021, https://arxiv.org/abs/1907.07585.

    Only the paper's abstract is available. It states that each relaxed feasible set holds
    the constraints of one sample per class (the class *representative*), that batches
    "contain the same sample from each class for a certain number of iterations", and that
    the representatives make hard class mining cheap. Everything else below is a
    **reconstruction** (the project's decisions), and each choice is a parameter:

    - A representative ``r_c`` is drawn uniformly from each class. It stays fixed for
      ``iterations_per_projection`` (T) batches; then every representative is redrawn and
      :attr:`projection` increases by one (one alternating-projection step per T batches).
    - Each batch holds ``classes_per_batch`` (k) distinct classes and ``samples_per_class``
      (m) indices of each: the class's representative first, then ``m - 1`` other samples of
      the class drawn without replacement. A class with fewer than ``m`` samples is filled
      with repeats (other samples drawn with replacement; a one-sample class repeats its
      representative).
    - ``mining="hard"``: a seed class is drawn uniformly and the other ``k - 1`` classes are
      its nearest classes by ``distance`` between the representatives' embeddings. The
      embeddings come from the training batches, given to
      :meth:`update_representative_embeddings` by the trainer (no extra forward pass), so
      they are as old as the last batch that held the representative. Classes whose
      representative has no embedding yet are never chosen as neighbours; free places are
      filled with random classes, and a seed class without an embedding gets random
      classes. ``mining="random"``: k classes drawn uniformly without replacement.
    - After a redraw the stored embeddings belong to the old representatives and are
      forgotten, unless ``keep_embeddings_across_projections=True`` (then a class keeps
      the embedding of its previous representative until the new one is seen).

    The sampler yields a flat stream of indices, ``k * m`` per batch, in batch order, so
    ``DataLoader(dataset, batch_size=k * m, sampler=sampler)`` gives the batches, as with
    PML's ``MPerClassSampler``. Batches are generated lazily, one at a time, so hard mining
    uses the newest embeddings (a ``DataLoader`` with workers prefetches a few batches,
    which then use embeddings that are that many batches older).

    Draws use ``c_f.NUMPY_RANDOM`` (PML's seeded RNG) unless ``seed`` is given, in which
    case the sampler owns a ``numpy.random.RandomState(seed)`` whose state is part of
    :meth:`state_dict`, so a resumed run yields exactly the stream it would have yielded.
    With PML's RNG, :meth:`state_dict` restores the representatives, the counters and the
    embeddings (the same projection continues), but not the global RNG.

    Args:
        labels: one label per dataset item (sequence, numpy array or tensor).
        classes_per_batch: k, distinct classes per batch.
        samples_per_class: m, samples per class in a batch (the representative included).
        iterations_per_projection: T, batches between two redraws of the representatives.
        mining: ``"hard"`` (nearest classes of a seed class) or ``"random"``.
        length_before_new_iter: indices per pass (rounded down to a multiple of ``k * m``,
            at least one batch). Default: the number of dataset items.
        distance: PML distance between representatives' embeddings for hard mining.
            Default ``LpDistance()`` (Euclidean on L2-normalised embeddings).
        keep_embeddings_across_projections: keep a class's embedding over a redraw.
        seed: seed of a private RNG; ``None`` uses ``c_f.NUMPY_RANDOM``.
        batch_size: optional; if given it must equal ``k * m`` (a check, as the batch size
            of the ``DataLoader`` must be ``k * m``).
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray | torch.Tensor,
        classes_per_batch: int,
        samples_per_class: int,
        iterations_per_projection: int,
        mining: str = "hard",
        length_before_new_iter: int | None = None,
        distance: BaseDistance | None = None,
        keep_embeddings_across_projections: bool = False,
        seed: int | None = None,
        batch_size: int | None = None,
    ) -> None:
        if torch.is_tensor(labels):
            labels = labels.cpu().numpy()
        labels = np.asarray(labels)
        if labels.ndim != 1 or len(labels) == 0:
            raise ValueError("labels must be a non-empty 1D sequence, one label per item")
        if mining not in ("hard", "random"):
            raise ValueError(f"mining must be 'hard' or 'random', got {mining!r}")
        for name, value in (
            ("classes_per_batch", classes_per_batch),
            ("samples_per_class", samples_per_class),
            ("iterations_per_projection", iterations_per_projection),
        ):
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.classes, class_of_index = np.unique(labels, return_inverse=True)
        self.num_classes = len(self.classes)
        self.classes_per_batch = int(classes_per_batch)
        self.samples_per_class = int(samples_per_class)
        if self.classes_per_batch > self.num_classes:
            raise ValueError(
                f"classes_per_batch={classes_per_batch} exceeds the {self.num_classes} "
                "classes in labels"
            )
        self.iterations_per_projection = int(iterations_per_projection)
        self.mining = mining
        self.batch_size = self.classes_per_batch * self.samples_per_class
        if batch_size is not None and int(batch_size) != self.batch_size:
            raise ValueError(
                f"batch_size={batch_size} must equal classes_per_batch * samples_per_class = "
                f"{self.classes_per_batch} * {self.samples_per_class} = {self.batch_size}"
            )
        length = len(labels) if length_before_new_iter is None else int(length_before_new_iter)
        self.num_batches = max(length // self.batch_size, 1)
        self.distance = LpDistance() if distance is None else distance
        self.keep_embeddings_across_projections = keep_embeddings_across_projections
        self.seed = seed
        self._own_rng = None if seed is None else np.random.RandomState(seed)

        self._class_of_index = class_of_index.astype(np.int64)
        self._by_class = np.argsort(self._class_of_index, kind="stable")
        self._class_counts = np.bincount(self._class_of_index, minlength=self.num_classes)
        self._class_starts = np.cumsum(self._class_counts) - self._class_counts

        #: batches generated so far (over all passes)
        self.iteration = 0
        #: index of the current representative set; +1 at every redraw
        self.projection = 0
        self.batches_in_projection = 0
        self.representatives = self._draw_representatives()
        self.embeddings: torch.Tensor | None = None
        self.has_embedding = np.zeros(self.num_classes, dtype=bool)
        self._batch_log: OrderedDict[tuple[int, ...], tuple[int, np.ndarray]] = OrderedDict()

    def __len__(self) -> int:
        return self.num_batches * self.batch_size

    def __iter__(self) -> Iterator[int]:
        for _ in range(self.num_batches):
            yield from self.next_batch()

    @property
    def rng(self) -> np.random.RandomState:
        return self._own_rng if self._own_rng is not None else c_f.NUMPY_RANDOM

    def next_batch(self) -> list[int]:
        """The dataset indices of the next batch (redraws the representatives every T)."""
        if self.batches_in_projection >= self.iterations_per_projection:
            self.redraw()
        classes = self.choose_classes()
        batch = np.empty((self.classes_per_batch, self.samples_per_class), dtype=np.int64)
        batch[:, 0] = self.representatives[classes]
        if self.samples_per_class > 1:
            for row, c in enumerate(classes):
                batch[row, 1:] = self._others(c, self.representatives[c])
        self.batches_in_projection += 1
        self.iteration += 1
        indices = batch.ravel().tolist()
        mask = np.arange(self.batch_size) % self.samples_per_class == 0  # representatives first
        self._batch_log[tuple(indices)] = (self.projection, mask)
        while len(self._batch_log) > BATCH_LOG_SIZE:
            self._batch_log.popitem(last=False)
        return indices

    def redraw(self) -> None:
        """Draws new representatives and starts the next projection."""
        self.representatives = self._draw_representatives()
        self.projection += 1
        self.batches_in_projection = 0
        if not self.keep_embeddings_across_projections:
            self.has_embedding[:] = False

    def _draw_representatives(self) -> np.ndarray:
        offsets = np.floor(self.rng.random_sample(self.num_classes) * self._class_counts)
        offsets = np.minimum(offsets.astype(np.int64), self._class_counts - 1)
        return self._by_class[self._class_starts + offsets]

    def _others(self, c: int, rep: int) -> np.ndarray:
        start = self._class_starts[c]
        others = self._by_class[start : start + self._class_counts[c]]
        others = others[others != rep]
        size = self.samples_per_class - 1
        if len(others) == 0:
            return np.full(size, rep, dtype=np.int64)
        return self.rng.choice(others, size=size, replace=len(others) < size)

    def choose_classes(self) -> np.ndarray:
        """Class positions (into :attr:`classes`) of the next batch, seed class first."""
        k = self.classes_per_batch
        if self.mining == "random":
            return self.rng.choice(self.num_classes, size=k, replace=False)
        seed = int(self.rng.randint(self.num_classes))
        chosen = [np.array([seed], dtype=np.int64)]
        if self.has_embedding[seed] and k > 1:
            candidates = np.flatnonzero(self.has_embedding)
            candidates = candidates[candidates != seed]
            if len(candidates) > 0:
                with torch.no_grad():
                    d = self.distance(
                        self.embeddings[seed].unsqueeze(0), self.embeddings[candidates]
                    )[0]
                order = torch.argsort(d, descending=self.distance.is_inverted, stable=True)
                chosen.append(candidates[order[: k - 1].numpy()])
        chosen_arr = np.concatenate(chosen)
        missing = k - len(chosen_arr)
        if missing > 0:
            rest = np.setdiff1d(np.arange(self.num_classes), chosen_arr, assume_unique=True)
            fill = self.rng.choice(rest, size=missing, replace=False)
            chosen_arr = np.concatenate([chosen_arr, fill])
        return chosen_arr

    def update_representative_embeddings(
        self, indices: torch.Tensor | np.ndarray | Sequence[int], embeddings: torch.Tensor
    ) -> None:
        """Stores the embeddings of the batch items that are current representatives.

        ``indices`` are the dataset indices of the batch, ``embeddings`` its embeddings
        (any device; detached and kept on the CPU in float32). Other items are ignored.
        """
        indices = _as_indices(indices)
        if len(indices) != len(embeddings):
            raise ValueError(
                f"got {len(indices)} indices for {len(embeddings)} embeddings; "
                "they must match one to one"
            )
        classes = self._class_of_index[indices]
        is_rep = self.representatives[classes] == indices
        if not is_rep.any():
            return
        emb = embeddings.detach().to("cpu", torch.float32)
        if self.embeddings is None or self.embeddings.shape[1] != emb.shape[1]:
            self.embeddings = torch.zeros(self.num_classes, emb.shape[1])
            self.has_embedding[:] = False
        rows = torch.from_numpy(np.flatnonzero(is_rep))
        self.embeddings[torch.from_numpy(classes[is_rep])] = emb[rows]
        self.has_embedding[classes[is_rep]] = True

    def representative_mask(self, indices: torch.Tensor | np.ndarray | Sequence[int]) -> np.ndarray:
        """Boolean mask of the positions holding a current representative (first copy only)."""
        indices = _as_indices(indices)
        mask = np.zeros(len(indices), dtype=bool)
        classes = self._class_of_index[indices]
        positions = np.flatnonzero(self.representatives[classes] == indices)
        _, first = np.unique(classes[positions], return_index=True)
        mask[positions[first]] = True
        return mask

    def batch_info(
        self, indices: torch.Tensor | np.ndarray | Sequence[int]
    ) -> tuple[int, np.ndarray]:
        """``(projection, representative mask)`` of a batch this sampler yielded.

        The batch is found by its indices among the last ``BATCH_LOG_SIZE`` batches, so the
        answer is right when a ``DataLoader`` with workers prefetches batches. A batch that
        is not found (reordered, or too old) gets the current projection and the positions of
        the current representatives.
        """
        key = tuple(_as_indices(indices).tolist())
        found = self._batch_log.get(key)
        if found is not None:
            return found[0], found[1].copy()
        return self.projection, self.representative_mask(key)

    def state_dict(self) -> dict[str, Any]:
        """Representatives, counters, embeddings and (with ``seed``) the RNG state."""
        state: dict[str, Any] = {
            "classes": torch.from_numpy(self.classes),
            "iteration": self.iteration,
            "projection": self.projection,
            "batches_in_projection": self.batches_in_projection,
            "representatives": torch.from_numpy(self.representatives.copy()),
            "embeddings": None if self.embeddings is None else self.embeddings.clone(),
            "has_embedding": torch.from_numpy(self.has_embedding.copy()),
            "rng": None,
        }
        if self._own_rng is not None:
            name, keys, pos, has_gauss, cached = self._own_rng.get_state()
            state["rng"] = {
                "keys": torch.from_numpy(keys.astype(np.int64)),
                "pos": int(pos),
                "has_gauss": int(has_gauss),
                "cached_gaussian": float(cached),
            }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not np.array_equal(np.asarray(torch.as_tensor(state["classes"]).cpu()), self.classes):
            raise ValueError("the saved sampler state belongs to a different label set")
        self.iteration = int(state["iteration"])
        self.projection = int(state["projection"])
        self.batches_in_projection = int(state["batches_in_projection"])
        self.representatives = np.asarray(
            torch.as_tensor(state["representatives"]).cpu(), dtype=np.int64
        )
        emb = state["embeddings"]
        self.embeddings = None if emb is None else torch.as_tensor(emb).detach().cpu().float()
        self.has_embedding = np.asarray(torch.as_tensor(state["has_embedding"]).cpu(), dtype=bool)
        self._batch_log.clear()
        rng = state.get("rng")
        if rng is not None:
            if self._own_rng is None:
                self._own_rng = np.random.RandomState()
            keys = np.asarray(torch.as_tensor(rng["keys"]).cpu()).astype(np.uint32)
            self._own_rng.set_state(
                ("MT19937", keys, rng["pos"], rng["has_gauss"], rng["cached_gaussian"])
            )
