"""The trained model's embeddings of (at most 3000 of) the query split's images, written by
the run into ``test_embeddings.npz`` so that figures (the 2-D scatter) never reload a
checkpoint or the data."""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import data as data_mod
from . import files

FILE_NAME = "test_embeddings.npz"
MAX_POINTS = 3000


def query_split(config: Mapping[str, Any], splits: Mapping[str, Any]) -> str:
    """The split the evaluation queries (not the validation split)."""
    plan = data_mod.eval_plan(config["dataset"]["name"], splits)
    query = [q for q, _ in plan if q != "val"]
    return query[0] if query else plan[-1][0]


def embed(
    models: Mapping[str, torch.nn.Module],
    dataset: Any,
    device: torch.device,
    max_points: int = MAX_POINTS,
) -> tuple[np.ndarray, np.ndarray]:
    """Raw (unnormalised) embeddings and labels of a fixed random subset (``RandomState(0)``,
    no global random state used) of at most ``max_points`` items of ``dataset``."""
    labels = data_mod.labels_of(dataset)
    idx = np.arange(len(labels))
    if len(idx) > max_points:
        idx = np.random.RandomState(0).choice(idx, max_points, replace=False)
    trunk, embedder = models["trunk"].eval(), models["embedder"].eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(idx), 256):
            batch = torch.stack([dataset[int(i)][0] for i in idx[start : start + 256]])
            out.append(embedder(trunk(batch.to(device))).float().cpu().numpy())
    return np.concatenate(out), labels[idx]


def write(folder: Path, embeddings: np.ndarray, labels: np.ndarray, split: str) -> Path:
    buffer = io.BytesIO()
    np.savez(buffer, embeddings=embeddings, labels=labels, split=np.array(split))
    return files.atomic_write(folder / FILE_NAME, buffer.getvalue())


def read(folder: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """``(embeddings, labels)`` of a run folder's file (no pickles), None without it."""
    path = folder / FILE_NAME
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as npz:
        return npz["embeddings"], npz["labels"]
