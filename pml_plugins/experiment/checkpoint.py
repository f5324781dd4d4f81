"""Checkpoints of a run: written atomically, read without unpickling, complete enough to
resume bit for bit on the CPU.

A checkpoint of epoch ``N`` is one ``{name}_{N}.pth`` per saveable trainer object (PML's
file names: models, optimizers, LR schedulers, losses, miners) and then ``state_N.pth``,
which marks the checkpoint complete. Every file is a plain ``state_dict`` of tensors,
numbers, strings, lists and dicts, written with :func:`.files.atomic_save` and read with
``torch.load(weights_only=True)``: nothing in a run folder is unpickled, so a planted
payload cannot run, and a damaged file is a :class:`.files.RunFileError` naming it.

State that a resumed run needs besides the weights (``state_N.pth``):

- the RNGs: Python's ``random``, NumPy's global one, PML's ``c_f.NUMPY_RANDOM`` (which
  samplers such as ``RepresentativeSampler`` draw from), torch's CPU generator (Metrix's
  mixing coefficient, the data loader's seeds, augmentations in the main process) and the
  CUDA generators where CUDA was used, stored as tensors and lists (no NumPy objects);
- the sampler: PML's ``MPerClassSampler`` shuffles its ``labels`` list in place in every
  ``__iter__`` and the trainer's data iterator lives across epochs, so an epoch that ends
  mid-pass (``iterations_per_epoch`` below a full pass) continues that pass in the next
  epoch. :class:`ResumableSampler` wraps a sampler without a ``state_dict`` and records
  the current pass's index order, how many batches the trainer took from it, and the
  wrapped sampler's in-place state, so the resumed run continues the same pass;
- the plugins' own ``state_dict`` (the trainer's, e.g. AlternatingProjections' proximal
  term, and a sampler that has one, e.g. RepresentativeSampler).

The models, optimizers (Adam's moments and step), LR schedulers, the losses' and the
miners' state dicts are PML's saveable trainer objects, one file each.

Not restored, so not bit for bit where random augmentations (the image data sets' crops
and flips; the embedded data set has none) draw from them:

- the RNGs inside data-loader worker processes: with ``num_workers > 0`` a resumed run's
  workers are seeded anew (with ``num_workers: 0`` augmentations draw from torch's
  restored CPU generator);
- the pass of a sampler with its own ``state_dict`` (``RepresentativeSampler``): its
  batches continue exactly, but a resumed run starts a new pass of the data loader, which
  draws a seed from torch's CPU generator at another iteration than the uninterrupted run.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pytorch_metric_learning.utils import common_functions as c_f
from torch.utils.data import Sampler

from . import files

STATE_PREFIX = "state_"
#: attributes that PML samplers change in place while iterating (MPerClassSampler.labels)
IN_PLACE_SAMPLER_ATTRIBUTES = ("labels",)
DAMAGED_FIX = (
    "it is damaged or was not written by pml-plugins (it was not loaded); remove the run "
    "folder's checkpoints/ to train from the start, or train into another --out"
)


# ---------------------------------------------------------------- RNG states


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's, torch's and PML's (``c_f.NUMPY_RANDOM``) RNGs."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    c_f.NUMPY_RANDOM = np.random.RandomState(seed)


def _numpy_state(rng: np.random.RandomState) -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = rng.get_state()
    return {
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }


def _set_numpy_state(rng: np.random.RandomState, state: Mapping[str, Any]) -> None:
    keys = np.asarray(state["keys"].numpy(), dtype=np.uint32)
    rng.set_state(("MT19937", keys, state["pos"], state["has_gauss"], state["cached_gaussian"]))


def _cuda_states() -> list[torch.Tensor]:
    """The CUDA generators' states where CUDA was used (none on the CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return list(torch.cuda.get_rng_state_all())
    return []


def rng_state() -> dict[str, Any]:
    """Python's, NumPy's, PML's, torch's CPU and CUDA RNG states as tensors, numbers and
    lists."""
    version, internal, gauss = random.getstate()
    return {
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "numpy": _numpy_state(np.random.mtrand._rand),
        "pml_numpy": _numpy_state(c_f.NUMPY_RANDOM),
        "torch": torch.get_rng_state(),
        "cuda": _cuda_states(),
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (the CUDA states where this process has as
    many CUDA devices as the one that saved them)."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    _set_numpy_state(np.random.mtrand._rand, state["numpy"])
    _set_numpy_state(c_f.NUMPY_RANDOM, state["pml_numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# ---------------------------------------------------------------- the sampler


class ResumableSampler(Sampler[int]):
    """A sampler without a ``state_dict`` (PML's ``MPerClassSampler``, torch's
    ``RandomSampler``) made resumable.

    Each pass's index order is drawn by the wrapped sampler, as without the wrapper (so
    the numbers of an uninterrupted run are the same), and kept. The run calls
    :meth:`batch_done` after every training iteration; :meth:`state_dict` is the pass's
    order, the batches taken from it, the wrapped sampler's in-place state and torch's RNG
    state. After :meth:`load_state_dict`, the next ``__iter__`` continues that pass where
    the trainer left it, and restores torch's RNG state that the data loader's new
    iterator used up; a pass with less than one batch left starts a new one, as the
    uninterrupted run does.
    """

    def __init__(self, inner: Sampler, batch_size: int) -> None:
        self.inner = inner
        self.batch_size = int(batch_size)
        self._order: list[int] = []
        self._taken = 0
        self._pending: dict[str, Any] | None = None

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> Iterator[int]:
        pending, self._pending = self._pending, None
        if pending is not None:
            start = pending["taken"] * self.batch_size
            if len(pending["order"]) - start >= self.batch_size:
                torch.set_rng_state(pending["torch_rng"])
                self._order, self._taken = pending["order"], pending["taken"]
                return iter(self._order[start:])
        self._order = [int(i) for i in self.inner]
        self._taken = 0
        return iter(self._order)

    def batch_done(self) -> None:
        """One batch of the current pass was used by the trainer."""
        self._taken += 1

    def state_dict(self) -> dict[str, Any]:
        in_place = {
            name: [int(x) for x in getattr(self.inner, name)]
            for name in IN_PLACE_SAMPLER_ATTRIBUTES
            if isinstance(getattr(self.inner, name, None), list)
        }
        return {
            "order": torch.tensor(self._order, dtype=torch.int64),
            "taken": self._taken,
            "in_place": in_place,
            "torch_rng": torch.get_rng_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for name, value in state["in_place"].items():
            setattr(self.inner, name, list(value))
        self._pending = {
            "order": state["order"].tolist(),
            "taken": int(state["taken"]),
            "torch_rng": state["torch_rng"],
        }


def make_resumable(sampler: Any, dataset: Any, batch_size: int) -> Any:
    """The sampler to give the trainer: ``sampler`` itself where it has its own
    ``state_dict`` or is a batch sampler, else a :class:`ResumableSampler` around it (around
    the ``RandomSampler`` a data loader would shuffle with, where ``sampler`` is None)."""
    if sampler is None:
        sampler = torch.utils.data.RandomSampler(dataset)
    if callable(getattr(sampler, "state_dict", None)) or isinstance(
        sampler, torch.utils.data.BatchSampler
    ):
        return sampler
    return ResumableSampler(sampler, batch_size)


# ---------------------------------------------------------------- files


def _object_path(folder: Path, name: str, epoch: int) -> Path:
    return folder / f"{name}_{epoch}.pth"


def state_path(folder: Path, epoch: int) -> Path:
    return folder / f"{STATE_PREFIX}{epoch}.pth"


def latest(folder: Path) -> int:
    """The last epoch whose checkpoint was completely written (0 if none)."""
    epochs = [p.stem.removeprefix(STATE_PREFIX) for p in folder.glob(f"{STATE_PREFIX}*.pth")]
    return max((int(e) for e in epochs if e.isdigit()), default=0)


def safe_load(path: Path, device: torch.device | str = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``; a damaged file or one holding anything but
    tensors and plain data is a :class:`.files.RunFileError` that names it."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise files.RunFileError(f"{path} is missing; {DAMAGED_FIX}") from None
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise files.RunFileError(
            f"{path} cannot be loaded ({reason[:200]}); {DAMAGED_FIX}"
        ) from None


def save(
    objects: Mapping[str, Mapping[str, Any]],
    folder: Path,
    epoch: int,
    state: Mapping[str, Any],
) -> None:
    """Write epoch ``epoch``'s checkpoint (each object, then the state file), then remove
    the previous epoch's."""
    for group in objects.values():
        for name, obj in group.items():
            sd = getattr(obj, "module", obj).state_dict()
            files.atomic_save(_object_path(folder, name, epoch), lambda f, sd=sd: torch.save(sd, f))
    files.atomic_save(state_path(folder, epoch), lambda f: torch.save(dict(state), f))
    previous = epoch - 1
    if previous > 0:
        for group in objects.values():
            for name in group:
                _object_path(folder, name, previous).unlink(missing_ok=True)
        state_path(folder, previous).unlink(missing_ok=True)


def load(
    objects: Mapping[str, Mapping[str, Any]],
    folder: Path,
    epoch: int,
    device: torch.device,
) -> dict[str, Any]:
    """Load epoch ``epoch``'s objects into ``objects``; returns the state file's content."""
    state = safe_load(state_path(folder, epoch))
    for group in objects.values():
        for name, obj in group.items():
            path = _object_path(folder, name, epoch)
            getattr(obj, "module", obj).load_state_dict(safe_load(path, device))
    return state
