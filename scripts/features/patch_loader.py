"""The extraction loader: co-centred patches of many slides, read by worker processes that each own whole cells.

Tiling orders a slide's patch centres cell by cell (``read_cell_um``, 1 mm by default), and the grouped reader
decodes each cell's chunks once. A map-style DataLoader deals *batches* round-robin to its workers, so the
chunks of one cell were decoded by several workers. Here each worker takes one contiguous run of whole cells of
every slide (worker w of W: the w-th of W runs of about equal patch count, cut at cell boundaries), so a chunk is
decoded by one worker except on the few cell rows where two runs meet. Workers return ready batches of the
reader's uint8 patches (3 x 256 x 256 per scale: 590 KB per position at three scales, a quarter of float32) with
each row's slide and position, so the main process files every feature row in its place: the store's content
and order do not depend on the number of workers. With no worker (or one), the batches are exactly the
consecutive positions of all slides, as before 0.13.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info


def loader_slide(path: str, tiles_dir: Path) -> dict:
    """One slide as :class:`CellDealtPatches` takes it, from its tiling entry: the patch centres, the level-0
    mpp as resolved when the slide was tiled, and the tiling's cell size in level-0 px."""
    meta = json.loads((Path(tiles_dir) / "meta.json").read_text())
    mpp = float(meta["mpp"])
    cell_um = float(meta.get("tiling", {}).get("read_cell_um") or 0.0)
    return {"path": path, "mpp": mpp, "coords": np.load(Path(tiles_dir) / "coords.npy"), "cell_px": cell_um / mpp if cell_um else 0.0}


def cell_runs(coords: np.ndarray, cell_px: float) -> np.ndarray:
    """Start index of every run of consecutive centres in one cell (plus ``len(coords)`` at the end); every
    index is a run start when ``cell_px`` is 0 (centres not grouped by cell)."""
    n = len(coords)
    if n == 0:
        return np.zeros(1, np.int64)
    if cell_px <= 0:
        return np.arange(n + 1, dtype=np.int64)
    cells = np.floor(np.asarray(coords, np.float64) / cell_px).astype(np.int64)
    change = np.flatnonzero((cells[1:] != cells[:-1]).any(axis=1)) + 1
    return np.concatenate([[0], change, [n]]).astype(np.int64)


def split_at_cells(runs: np.ndarray, parts: int) -> list[int]:
    """``parts + 1`` cut points into a slide's positions: contiguous runs of whole cells, about equal in size."""
    n = int(runs[-1])
    cuts = [0]
    for w in range(1, parts):
        cut = int(runs[np.argmin(np.abs(runs - n * w / parts))])
        cuts.append(max(cut, cuts[-1]))
    cuts.append(n)
    return cuts


def deal_cells(runs: Sequence[np.ndarray], workers: int, tolerance: float = 1.15) -> list[list[tuple[int, int, int]]]:
    """(slide, start, stop) blocks of each worker: whole slides where they balance the load, otherwise slides cut
    into runs of whole cells (each cut costs the chunks both sides share), dealt longest first to the least loaded
    worker; each worker's blocks in slide order. Deterministic."""
    sizes = [int(r[-1]) for r in runs]
    total = sum(sizes)
    target = total / max(1, workers)
    for _ in range(8):
        blocks = []
        for si, r in enumerate(runs):
            cuts = split_at_cells(r, max(1, int(np.ceil(sizes[si] / target - 1e-9))) if target > 0 else 1)
            blocks += [(si, a, b) for a, b in zip(cuts, cuts[1:]) if b > a]
        loads, owner = [0] * workers, {}
        for blk in sorted(blocks, key=lambda b: (-(b[2] - b[1]), b[0], b[1])):
            w = min(range(workers), key=lambda w: (loads[w], w))
            owner[blk] = w
            loads[w] += blk[2] - blk[1]
        if workers == 1 or max(loads) <= tolerance * total / workers or target < 2:
            break
        target /= 2
    return [sorted(b for b in blocks if owner[b] == w) for w in range(workers)]


class CellDealtPatches(IterableDataset):
    """Batches of ``transform``-read patches of ``slides`` (dicts with ``path``, ``mpp``, ``coords`` [N, 2] and
    ``cell_px``), each worker reading its runs of whole cells of every slide in slide order.

    Each batch: one tensor per ``scale_keys`` entry ([B, C, H, W], the reader's dtype: uint8), ``slide_index`` and
    ``position`` (int64 [B]). Use with ``DataLoader(batch_size=None)``.
    """

    def __init__(self, slides: Sequence[dict], transform: Callable[[dict], dict], scale_keys: Sequence[str], batch_size: int) -> None:
        super().__init__()
        self.slides, self.transform, self.scale_keys, self.batch_size = list(slides), transform, list(scale_keys), int(batch_size)
        self.runs = [cell_runs(s["coords"], float(s.get("cell_px") or 0.0)) for s in self.slides]

    def blocks(self, worker: int, workers: int) -> list[tuple[int, int, int]]:
        """(slide index, start, stop) of the positions ``worker`` of ``workers`` reads, in reading order."""
        return deal_cells(self.runs, workers)[worker]

    def __len__(self) -> int:  # positions, for progress bars
        return sum(len(s["coords"]) for s in self.slides)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rows: list[tuple[int, int, dict]] = []
        for si, start, stop in self.blocks(worker, workers):
            s = self.slides[si]
            for pos in range(start, stop):
                item = {"path": s["path"], "centre": s["coords"][pos].astype(np.float32), "mpp": s["mpp"], "mpp_force": True,
                        "slide_index": si}
                rows.append((si, pos, self.transform(item)))
                if len(rows) == self.batch_size:
                    yield self._collate(rows)
                    rows = []
        if rows:
            yield self._collate(rows)

    def _collate(self, rows: list[tuple[int, int, dict]]) -> dict[str, Any]:
        shared = get_worker_info() is not None  # stack straight into shared memory: the hand-over then copies nothing
        batch: dict[str, Any] = {k: _stack([torch.as_tensor(r[2][k]) for r in rows], shared) for k in self.scale_keys}
        batch["slide_index"] = torch.tensor([r[0] for r in rows], dtype=torch.int64)
        batch["position"] = torch.tensor([r[1] for r in rows], dtype=torch.int64)
        return batch


def _stack(tensors: list[torch.Tensor], shared: bool) -> torch.Tensor:
    if not shared:
        return torch.stack(tensors)
    out = torch.empty((len(tensors), *tensors[0].shape), dtype=tensors[0].dtype).share_memory_()
    return torch.stack(tensors, out=out)


def patch_loader(dataset: CellDealtPatches, num_workers: int, pin_memory: bool) -> torch.utils.data.DataLoader:
    """A DataLoader over ready batches (no re-collation); pinned host memory for CUDA copies."""
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                                       prefetch_factor=4 if num_workers else None)
