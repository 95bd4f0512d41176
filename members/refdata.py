"""Evaluation data grouped by reference image: one item = one reference + a chunk of its distorted images.

Items come reference after reference, so a consumer that keeps only the current reference's state
(computed when `ref_key` changes) computes it once per reference with bounded memory. Every item
carries the reference's views again (one image decode, cheap next to the model) so that any item can
be used on its own, e.g. by a DataLoader worker or after a restart.
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch.utils.data import Dataset

from members.data import LabelStats, Pair, load_rgb
from members.views import ViewConfig, apply_view, count_views, make_views


def reference_chunks(pairs: list[Pair], chunk: int) -> list[tuple[str, list[int]]]:
    """(reference key, indices into `pairs`) in chunks of at most `chunk` distorted images.

    References are keyed by their file (two lists naming one file share it); they come in order of
    first appearance, their images in list order.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1; got {chunk}")
    groups: dict[str, list[int]] = defaultdict(list)
    for i, pair in enumerate(pairs):
        groups[str(pair.ref)].append(i)
    return [(key, idx[a:a + chunk]) for key, idx in groups.items() for a in range(0, len(idx), chunk)]


def process_share(chunks: list[tuple[str, list[int]]], process: int, processes: int) -> list[tuple[str, list[int]]]:
    """The chunks one of `processes` processes scores: whole references (the k-th reference in order of
    first appearance goes to process k mod processes), so that each reference's state is computed once
    in all. The chunks themselves do not depend on the process count, and neither do the scores."""
    if not 0 <= process < processes:
        raise ValueError(f"process {process} is not one of {processes}")
    order: dict[str, int] = {}
    for key, _ in chunks:
        order.setdefault(key, len(order))
    return [(key, idx) for key, idx in chunks if order[key] % processes == process]


class RefGroupPairs(Dataset):
    """Chunks of pairs sharing a reference, with every deterministic view of each image.

    Item: {"ref_key": str, "ref": (V, 3, crop, crop), "dis": (n, V, 3, crop, crop), "index": (n,) int64
    into `pairs`, "label": (n,) normalised MOS or nan}. Use it with `batch_size=None` (items are batches).
    `chunk` is the one meaning of a prediction batch size: distorted images per item. With
    `processes` > 1 the dataset holds only this `process`'s references (`process_share`).
    """

    def __init__(self, pairs: list[Pair], crop: int, views: ViewConfig, stats: LabelStats | None,
                 chunk: int = 8, upscale_small: bool = False, process: int = 0, processes: int = 1) -> None:
        self.pairs, self.crop, self.views, self.stats = pairs, crop, views, stats
        self.min_size = crop if upscale_small else 0
        self.n_views = count_views(views)
        self.chunks = process_share(reference_chunks(pairs, chunk), process, processes)

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> dict:
        key, index = self.chunks[i]
        ref = load_rgb(self.pairs[index[0]].ref, self.min_size)
        views = make_views(ref.shape[1], ref.shape[2], self.crop, self.views)
        dis, labels = [], []
        for j in index:
            pair = self.pairs[j]
            img = load_rgb(pair.dis, self.min_size)
            if img.shape != ref.shape:
                raise ValueError(f"{pair.source}: {pair.name} is {tuple(img.shape[1:])} but its reference "
                                 f"is {tuple(ref.shape[1:])}")
            dis.append(torch.stack([apply_view(img, v, self.crop) for v in views]))
            known = self.stats is not None and pair.mos is not None
            labels.append(self.stats.normalise(pair.mos) if known else math.nan)
        return {"ref_key": key, "ref": torch.stack([apply_view(ref, v, self.crop) for v in views]),
                "dis": torch.stack(dis), "index": torch.tensor(index, dtype=torch.int64),
                "label": torch.tensor(labels, dtype=torch.float32)}
