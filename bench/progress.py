"""Progress of `make bench` on stderr: which row, group, member and way, pairs done, time left.

Work is counted in backbone crops, the bulk of either way's time: the release's way runs the full
backbones on 2 x V crops per pair and member; the kit's way the truncated ones on V x (1 + 1/D) crops
per pair for all members of a group, each such crop counted at KIT_CROP of a full one (five of the
twelve ViT blocks, plus every member's heads). Time left = elapsed / work done x work left: rough,
and it improves as the run goes.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator

KIT_CROP = 0.5


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


class Progress:
    """Lines like `[bench] ahiq_c group 2/3 vit_base_patch16_224@224: (a) member 1 of 2, 3 pairs; 2 min so far, about 6 min left`."""

    def __init__(self, total: float, stream=None) -> None:
        self.total, self.done = max(total, 1e-9), 0.0
        self.started = time.perf_counter()
        self.stream = stream or sys.stderr

    def advance(self, work: float, what: str) -> None:
        self.done += work
        elapsed = time.perf_counter() - self.started
        left = elapsed / self.done * max(self.total - self.done, 0.0) if self.done else float("nan")
        print(f"[bench] {what}; {duration(elapsed)} so far, about {duration(left)} left", file=self.stream, flush=True)

    def say(self, what: str) -> None:
        print(f"[bench] {what}", file=self.stream, flush=True)


def release_work(pairs: int, views: int, members: int = 1) -> float:
    return 2.0 * views * pairs * members


def kit_work(pairs: int, views: int, dis: int) -> float:
    return KIT_CROP * views * pairs * (1 + 1 / dis)


class Reported(Iterable):
    """The bench's reference-grouped items cut into the slices the engine scores at once (`step`
    distorted images, so the computation is unchanged), reporting each slice to `progress`.
    Iterable more than once (a test may count the pairs before scoring)."""

    def __init__(self, items: list[dict], step: int, progress: Progress | None, what: str, views: int,
                 dis: int, total_pairs: int) -> None:
        self.items, self.step, self.progress, self.what = items, step, progress, what
        self.views, self.dis, self.total = views, dis, total_pairs

    def __iter__(self) -> Iterator[dict]:
        done = 0
        for item in self.items:
            n = len(item["index"])
            for a in range(0, n, self.step):
                part = {**item, "dis": item["dis"][a:a + self.step], "index": item["index"][a:a + self.step]}
                yield part
                done += len(part["index"])
                if self.progress is not None:
                    self.progress.advance(kit_work(len(part["index"]), self.views, self.dis),
                                          f"{self.what}: (b) {done} of {self.total} pairs")
