"""The torch side of the data: decoding an image (`load_rgb`), training pairs with random views
(`TrainPairs`), and evaluation data grouped by reference image (`RefGroupPairs`).

RefGroupPairs: one item = one reference + a chunk of its distorted images.

Items come reference after reference, so a consumer that keeps only the current reference's state
(computed when `ref_key` changes) computes it once per reference with bounded memory. Every item
carries the reference's views again (one image decode, cheap next to the model) so that any item can
be used on its own, e.g. by a DataLoader worker or after a restart.

Blind members (model.kind nr) get the blind item kind of both datasets (`blind=True`): items without
"ref", whose references are never opened (they may be absent: the no-reference track lists none).
"""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from members.contract.data_config import AugmentConfig, DataError, ViewConfig
from members.data.augment import jitter_pair, rescale_pair
from members.data.index import Pair, as_rgb
from members.data.splits import LabelStats
from members.data.views import apply_view, count_views, make_views, random_view


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


def blind_chunks(pairs: list[Pair], chunk: int) -> list[tuple[str, list[int]]]:
    """(chunk key, indices into `pairs`) in list order, `chunk` distorted images each: a blind member has
    no reference state to share, so chunks do not stop at references."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1; got {chunk}")
    return [(f"chunk{a // chunk}", list(range(a, min(a + chunk, len(pairs))))) for a in range(0, len(pairs), chunk)]


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
    `blind`: items of a blind member: no "ref" (never opened), chunks in list order (`blind_chunks`).
    """

    def __init__(self, pairs: list[Pair], crop: int, views: ViewConfig, stats: LabelStats | None,
                 chunk: int = 8, upscale_small: bool = False, process: int = 0, processes: int = 1,
                 blind: bool = False) -> None:
        self.pairs, self.crop, self.views, self.stats, self.blind = pairs, crop, views, stats, blind
        self.min_size = crop if upscale_small else 0
        self.n_views = count_views(views)
        chunks = blind_chunks(pairs, chunk) if blind else reference_chunks(pairs, chunk)
        self.chunks = process_share(chunks, process, processes)

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> dict:
        key, index = self.chunks[i]
        if self.blind:
            return self._blind_item(key, index)
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

    def _blind_item(self, key: str, index: list[int]) -> dict:
        """The distorted images alone, each on the views of its own size."""
        dis, labels = [], []
        for j in index:
            pair = self.pairs[j]
            img = load_rgb(pair.dis, self.min_size)
            dis.append(torch.stack([apply_view(img, v, self.crop) for v in make_views(img.shape[1], img.shape[2],
                                                                                        self.crop, self.views)]))
            known = self.stats is not None and pair.mos is not None
            labels.append(self.stats.normalise(pair.mos) if known else math.nan)
        return {"ref_key": key, "dis": torch.stack(dis), "index": torch.tensor(index, dtype=torch.int64),
                "label": torch.tensor(labels, dtype=torch.float32)}


def load_rgb(path: Path, min_size: int = 0) -> torch.Tensor:
    """Decode an image as (3, H, W) float32 in [0, 1]; bicubic-upscale it when a side is < `min_size`.

    The upscale keeps the aspect ratio and depends only on the size, so a distorted image and its
    reference of the same size stay aligned.
    """
    try:
        with Image.open(path) as im:
            im = as_rgb(im, path)
    except DataError:
        raise
    except Exception as err:  # checked up front, so the file changed or went away during the run
        raise DataError(f"{path}: cannot read this image any more ({type(err).__name__}: {err}); it passed "
                        "the check when the run started: restore it, then rerun the same command") from None
    if min(im.size) < min_size:
        scale = min_size / min(im.size)
        size = tuple(max(min_size, round(s * scale)) for s in im.size)
        im = im.resize(size, Image.Resampling.BICUBIC)
    return torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)


class TrainPairs(Dataset):
    """Training pairs: one random aligned crop (+ flip) per item, labels normalised by `stats`.

    The crop of item i in epoch e comes from `np.random.default_rng([seed, e, i])`, so it does not
    depend on workers, processes or the order items are drawn in (exact resume relies on it). Call
    `set_epoch` before iterating each epoch. The epoch lives in shared memory, so that persistent
    DataLoader workers (forked or spawned once, each with its own copy of the dataset) see it too.
    `blind`: items without "ref" (the reference is never opened).
    """

    def __init__(self, pairs: list[Pair], crop: int, augment: AugmentConfig, stats: LabelStats, seed: int,
                 upscale_small: bool = False, weights: list[float] | None = None, blind: bool = False) -> None:
        unlabelled = [p for p in pairs if p.mos is None]
        if unlabelled:
            raise DataError(f"{unlabelled[0].source}: training needs labels; {unlabelled[0].name} has none")
        if seed < 0:
            raise ValueError(f"seed must be >= 0; got {seed}")
        self.pairs, self.crop, self.augment, self.stats, self.seed = pairs, crop, augment, stats, seed
        self.min_size = crop if upscale_small else 0
        # One int64 in shared memory: a copy of the dataset pickled into a worker shares it
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()
        # Loss weight of each pair (data.pseudo_weight for pseudo-labelled ones); None: every item weighs
        # 1 and items carry no "weight" (the loss is plain MSE, as without pseudo-labels).
        if weights is not None and len(weights) != len(pairs):
            raise ValueError(f"{len(weights)} weights for {len(pairs)} pairs")
        self.weights = weights
        self.blind = blind

    @property
    def epoch(self) -> int:
        return int(self._epoch.numpy()[0])

    def set_epoch(self, epoch: int) -> None:
        """Written before the epoch's iterator hands out its first index, so no worker reads it early."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0; got {epoch}")
        self._epoch.fill_(epoch)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        pair = self.pairs[i]
        dis = load_rgb(pair.dis, self.min_size)
        ref = None if self.blind else load_rgb(pair.ref, self.min_size)  # a blind member never opens it
        rng = np.random.default_rng([self.seed, self.epoch, i])
        strength = self.augment.strength
        noisy = np.random.default_rng([self.seed, self.epoch, i, 1]) if strength else None  # its own stream
        if noisy is not None:
            dis, ref = rescale_pair(dis, ref, self.crop, strength, noisy)
        view = random_view(dis.shape[1], dis.shape[2], self.crop, self.augment, rng)
        dis_crop = apply_view(dis, view, self.crop)
        ref_crop = None if ref is None else apply_view(ref, view, self.crop)  # the same crop of the reference
        if noisy is not None:
            dis_crop, ref_crop = jitter_pair(dis_crop, ref_crop, strength, noisy)
        label = torch.tensor(self.stats.normalise(pair.mos), dtype=torch.float32)
        item = {"index": i, "dis": dis_crop, "label": label}
        if ref_crop is not None:
            item["ref"] = ref_crop
        if self.weights is not None:
            item["weight"] = torch.tensor(self.weights[i], dtype=torch.float32)
        return item
