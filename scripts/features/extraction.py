"""Feature extraction: co-centred multi-scale patches -> one encoder per scale -> the feature store.

All pending slides stream through one loader whose workers read whole cells of every slide as uint8
(:mod:`scripts.features.patch_loader`); the intensity preprocessing runs on the encoder's device
(:mod:`scripts.features.device_preprocessing`). Each slide's features are gathered in memory ([N, S, D]
float16, small), every row in its position, and its store entry is written atomically as soon as its last
patch is encoded, so a killed run loses at most the slides in flight.

Several processes may fill one store at once (torchrun ranks, or independent jobs on a shared
filesystem): a process claims a slide (``<entry>.lock``, :func:`scripts.cache.try_claim`) before encoding
it, so each slide is computed once. Under torchrun the pending slides are first dealt to ranks balanced by
patch count (tissue area); a rank that finishes its share takes over slides nobody holds (e.g. those of a
rank that died), then waits for slides other live processes are still encoding.
"""

from __future__ import annotations

import enum
import json
import logging
import platform
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from tqdm import tqdm

from scripts.cache import atomic_dir, atomic_save_npy, claim_holder, release_claim, remove_stale_temporaries, stable_hash, try_claim
from scripts.data.ids import folder_name
from scripts.data.manifest import SlideRecord
from scripts.distributed import rank_world
from scripts.errors import BundleInputError, DiskFullError, find_input_error
from scripts.features.device_preprocessing import attach, split_transform
from scripts.features.encoders import encoder_signature
from scripts.features.patch_loader import CellDealtPatches, loader_slide, patch_loader
from scripts.features.stain import hed_jitter
from scripts.features.stain_views import StainViews, views_path
from scripts.features.store import FeatureEntry, is_complete
from scripts.interrupts import check_stop

logger = logging.getLogger(__name__)

STORE_VERSION = 1


def _versions() -> dict:
    import monai

    return {"python": platform.python_version(), "torch": torch.__version__, "monai": monai.__version__, "numpy": np.__version__}


def transform_signature(obj: Any) -> Any:
    """What the store hashes about the patch preprocessing, read from the transforms themselves: each MONAI
    transform's type and its public settings (sizes, modes, intensity ranges, mean/std, dtypes), recursively
    through ``Compose`` and wrapped array transforms; runtime state (private attributes, random states, open
    readers) is left out. Call it before the transform is used."""
    from monai.transforms import Randomizable, Transform

    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, (list, tuple)):
        return [transform_signature(v) for v in obj]
    if isinstance(obj, Mapping):
        return {str(k): transform_signature(v) for k, v in obj.items()}
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return np.asarray(obj).tolist()
    if isinstance(obj, (np.generic,)):
        return obj.item()
    if isinstance(obj, (torch.dtype, np.dtype, type)):
        return str(obj)
    if isinstance(obj, Transform):
        out = {"type": f"{type(obj).__module__}.{type(obj).__qualname__}"}
        for k, v in sorted(vars(obj).items()):
            if k.startswith("_") or isinstance(v, (np.random.RandomState, np.random.Generator)) or (isinstance(obj, Randomizable) and k == "R"):
                continue
            sig = transform_signature(v)
            if sig is not _SKIP:
                out[k] = sig
        return out
    return _SKIP


_SKIP = "<not part of the signature>"


def entry_name(slide_id: str, tiles_dir: Path, encoders_sig: list[dict], preprocessing: dict) -> tuple[str, dict]:
    """Store directory name and the provenance it hashes."""
    provenance = {
        "version": STORE_VERSION,
        "tiles": Path(tiles_dir).name,  # already a hash of slide fingerprint + tiling parameters
        "encoders": encoders_sig,
        "preprocessing": preprocessing,
    }
    return f"{folder_name(slide_id)}-{stable_hash(provenance)}", provenance  # ids are data, not paths


def extract_cohort(
    records: Sequence[SlideRecord],
    tiles_dirs: Sequence[Path],
    store_dir: str | Path,
    encoders: Sequence[torch.nn.Module],
    encoder_arch: str,
    transform: Callable,
    scale_keys: Sequence[str],
    preprocessing: dict | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    stats: dict | None = None,
    on_error: str = "raise",
    output_dir: str | Path | None = None,
    stain_views: StainViews | None = None,
) -> list[FeatureEntry]:
    """Encode every slide that has no store entry yet; return the entries of all slides, in order, each with its
    manifest record (entries are found by the slide's id, its tiles and the encoders' provenance; labels and
    patient ids are the records', never the cache's).

    ``stats`` (optional dict) receives ``computed``: the slide ids encoded by this call. With
    ``on_error='skip'`` a slide failing with an input error (e.g. truncated) is left out and recorded in
    ``<output_dir>/failures.csv``; the entries of the other slides are returned. ``preprocessing`` (what the store
    hashes about the patch transforms) defaults to :func:`transform_signature` of ``transform``. With
    ``stain_views`` every returned entry also gets its stain-augmented views (:mod:`scripts.features.stain_views`),
    encoded for the entries that lack them; a slide whose views fail is skipped (``on_error='skip'``) like one whose
    features fail.
    """
    from scripts.workflows.failures import check_policy

    check_policy(on_error)
    store_dir = Path(store_dir)
    store_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(store_dir)
    device = torch.device(device)
    sigs = [encoder_signature(e, encoder_arch) for e in encoders]
    preprocessing = transform_signature(transform) if preprocessing is None else preprocessing
    targets, pending = [], []
    for rec, tdir in zip(records, tiles_dirs):
        name, prov = entry_name(rec.slide_id, Path(tdir), sigs, preprocessing)
        targets.append(store_dir / name)
        if not is_complete(store_dir / name):
            pending.append((rec, Path(tdir), store_dir / name, prov))
    rank, world = rank_world()
    progress = progress and rank == 0
    computed: list[str] = []
    if pending:
        mine = [pending[i] for i in balanced_shard([_num_patches(j[1]) for j in pending], world, rank)] if world > 1 else pending
        logger.info("extracting features of %d / %d slides%s", len(pending), len(records),
                    f" ({len(mine)} on rank {rank} of {world})" if world > 1 else "")
        run = lambda jobs: _extract(jobs, encoders, transform, scale_keys, batch_size, num_workers, device, progress)  # noqa: E731
        computed += _claim_and_extract(mine, run, on_error, output_dir)
        if world > 1:  # then anything nobody holds (slides of a rank that died), waiting for live holders
            computed += _claim_and_extract(pending, run, on_error, output_dir)
    if stats is not None:
        stats["computed"] = computed
    entries = [FeatureEntry(t, rec) for t, rec in zip(targets, records) if is_complete(t)]
    if stain_views is not None:
        _extract_views(entries, {str(t): Path(d) for t, d in zip(targets, tiles_dirs)}, stain_views, encoders, transform, scale_keys,
                       batch_size, num_workers, device, progress, on_error, output_dir, stats)
        # with on_error='skip' a slide whose views failed (recorded in failures.csv) is left out like a slide whose
        # features failed: training reads every returned entry's views
        entries = [e for e in entries if views_path(e.path, stain_views).is_file()]
    return entries


def _extract_views(entries, tiles_of, spec, encoders, transform, scale_keys, batch_size, num_workers, device, progress, on_error,
                   output_dir, stats) -> None:
    """Encode the stain views (``spec``) of the ``entries`` that lack them (claimed per views file, as entries are)."""
    pending = [(e.record, tiles_of[str(e.path)], views_path(e.path, spec), spec) for e in entries if not views_path(e.path, spec).is_file()]
    done: list[str] = []
    for job in pending:  # what a killed run left in the entry (its temporary file, its claim)
        remove_stale_temporaries(job[2].parent)
    if pending:
        rank, world = rank_world()
        mine = [pending[i] for i in balanced_shard([_num_patches(j[1]) for j in pending], world, rank)] if world > 1 else pending
        logger.info("encoding %d stain views of %d / %d slides", spec.views, len(pending), len(entries))
        run = lambda jobs: _extract(jobs, encoders, transform, scale_keys, batch_size, num_workers, device, progress and rank == 0,  # noqa: E731
                                    views=spec)
        done += _claim_and_extract(mine, run, on_error, output_dir, complete=Path.is_file)
        if world > 1:
            done += _claim_and_extract(pending, run, on_error, output_dir, complete=Path.is_file)
    if stats is not None:
        stats["views_computed"] = done



def _num_patches(tiles_dir: Path) -> int:
    return int(np.load(Path(tiles_dir) / "coords.npy", mmap_mode="r").shape[0])


def balanced_shard(costs: Sequence[int], world: int, rank: int) -> list[int]:
    """Indices of ``costs`` (patches per slide, i.e. tissue area) dealt to ``rank``: greedy longest-first onto
    the least-loaded rank (deterministic, so every rank computes the same partition)."""
    loads = [0] * world
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (loads[r], r))
        owner[i] = r
        loads[r] += costs[i]
    return [i for i in range(len(costs)) if owner[i] == rank]


def _claim_and_extract(jobs: list, run: Callable[[list], list[str]], on_error: str = "raise", output_dir=None,
                       poll_s: float = 1.0, complete: Callable[[Path], bool] = is_complete) -> list[str]:
    """Encode the ``jobs`` this process can claim; wait for those other live processes hold; repeat until every
    job's target (a store entry, or a views file) is ``complete`` (or, with ``on_error='skip'``, failed). Returns
    the slide ids encoded here."""
    from scripts.workflows.failures import record

    done: list[str] = []
    failed: set[str] = set()
    todo = [j for j in jobs if not complete(j[2])]
    announced = False
    while todo:
        claimed = [j for j in todo if try_claim(j[2])]
        mine = []
        for j in claimed:
            if complete(j[2]):  # finished by another process between the check and the claim
                release_claim(j[2])
            else:
                mine.append(j)
        try:
            if mine:
                done += run(mine)
        except Exception as exc:  # noqa: BLE001 - input errors of one slide may be skipped, the rest re-raised
            bad = _failed_job(exc, mine) if on_error == "skip" else None
            if bad is None:
                raise
            record("extract", bad[0].slide_id, find_input_error(exc), output_dir)
            failed.add(str(bad[2]))
        finally:
            for j in mine:
                release_claim(j[2])
        todo = [j for j in todo if not complete(j[2]) and str(j[2]) not in failed]
        if todo and not mine:
            if not announced:
                holders = {str(claim_holder(j[2])) for j in todo}
                logger.info("waiting for %d slides being encoded by other processes (%s)", len(todo), ", ".join(sorted(holders))[:200])
                announced = True
            time.sleep(poll_s)
    return done


def _failed_job(exc: BaseException, jobs: list):
    """The job whose slide an input error in ``exc``'s chain names, or None."""
    found = find_input_error(exc)
    if found is None or isinstance(found, DiskFullError):  # a full disk is no fault of the slide
        return None
    for j in jobs:
        if Path(found.path).resolve() == Path(j[0].path).resolve():
            return j
    return None


def _extract(pending, encoders, transform, scale_keys, batch_size, num_workers, device, progress, views: StainViews | None = None) -> list[str]:
    """Encode the slides of ``pending``: workers read whole cells as uint8 (:mod:`scripts.features.patch_loader`),
    the intensity preprocessing runs on ``device`` as the encoders' first layer
    (:mod:`scripts.features.device_preprocessing`); on CUDA the host batches are pinned, copies are asynchronous
    and a batch's features come back while the next batch is encoded. With ``views`` the slides' stain views are
    encoded instead (each batch re-stained once per view on the device) and written to their views files."""
    slides = [loader_slide(rec.path, tdir) for rec, tdir, _, _ in pending]
    counts = [len(s["coords"]) for s in slides]
    worker_transform, on_device = split_transform(transform)
    if views is not None and on_device is None:
        raise BundleInputError(None, "stain views need the patch preprocessing on the device (the reader's uint8 patches)",
                               "keep ScaleIntensityRanged / NormalizeIntensityd last in 'preprocessing', or set stain_views to 0")
    factors = [views.factors(rec.slide_id) for rec, _, _, _ in pending] if views is not None else None
    cuda = device.type == "cuda"
    loader = patch_loader(CellDealtPatches(slides, worker_transform, scale_keys, batch_size), num_workers, pin_memory=cuda)
    encoders = [e.to(device).eval().to(memory_format=torch.channels_last) for e in attach(encoders, on_device)]  # faster on CPU and GPU
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    buffers: dict[int, np.ndarray] = {}
    filled = [0] * len(pending)
    done: list[str] = []
    bar = tqdm(total=sum(counts), desc="extract patches" if views is None else f"extract {views.views} stain views", unit="patch",
               disable=not progress)
    write = _write_entry if views is None else _write_views

    def file_rows(features: torch.Tensor, ready: Any, slide_idx: np.ndarray, positions: np.ndarray) -> None:
        if ready is not None:
            ready.synchronize()  # the asynchronous copy of this batch's features has landed
        f = features.numpy()  # [B, S, D] float32 ([B, V, S, D] for views)
        for si in np.unique(slide_idx):
            sel = slide_idx == si
            buf = buffers.setdefault(int(si), np.empty((counts[si], *f.shape[1:]), np.float16))
            buf[positions[sel]] = f[sel]
            filled[si] += int(sel.sum())
            if filled[si] == counts[si]:
                write(pending[si], buffers.pop(int(si)))
                release_claim(pending[si][2])  # waiters may go on at once
                done.append(pending[si][0].slide_id)
        bar.update(len(slide_idx))

    in_flight = None  # CUDA: the batch whose features are still being copied back while the next one is encoded
    with torch.inference_mode(), autocast:
        try:
            for batch in loader:
                check_stop()  # a stop signal seen off the main thread (the Deploy app): unwind between batches
                xs = [batch[key].to(device, non_blocking=True) for key in scale_keys]
                if views is None:
                    feats = _encode(encoders, xs)
                else:  # [B, V, S, D]: every view re-stains the batch with its slide's factors for that view
                    alpha, beta = (torch.stack([factors[int(i)][j] for i in batch["slide_index"]]).to(device) for j in (0, 1))
                    feats = torch.stack([_encode(encoders, [hed_jitter(x, alpha[:, v], beta[:, v]) for x in xs]) for v in range(views.views)], dim=1)
                rows = (batch["slide_index"].numpy(), batch["position"].numpy())
                if in_flight is not None:
                    file_rows(*in_flight)
                    in_flight = None
                if cuda:
                    ready = torch.cuda.Event()
                    in_flight = (feats.to("cpu", non_blocking=True), ready, *rows)
                    ready.record()
                else:
                    file_rows(feats, None, *rows)
        finally:  # a failing read later on must not lose a slide whose rows are all encoded
            if in_flight is not None:
                file_rows(*in_flight)
    bar.close()
    return done


def _encode(encoders, xs: list[torch.Tensor]) -> torch.Tensor:
    """[B, S, D] float32 features of one batch's scales ``xs``."""
    return torch.stack([enc(x.contiguous(memory_format=torch.channels_last)).float() for enc, x in zip(encoders, xs)], dim=1)


def _write_views(job, views: np.ndarray) -> None:
    """Atomically write a slide's stain views ([N, V, S, D] as gathered -> [V, N, S, D])."""
    rec, _, target, _ = job
    if not np.isfinite(views).all():
        raise BundleInputError(rec.path, "encoder produced NaN/Inf features of a stain view", "check the encoder weights and stain_views_sigma / stain_views_bias")
    atomic_save_npy(target, np.ascontiguousarray(views.transpose(1, 0, 2, 3)))
    logger.info("encoded %d stain views of %s -> %s", views.shape[1], rec.slide_id, target.name)


def _write_entry(job, features: np.ndarray) -> None:
    rec, tdir, target, prov = job
    if not np.isfinite(features).all():
        raise BundleInputError(
            rec.path, "encoder produced NaN/Inf features", "check the encoder weights and the intensity normalisation"
        )
    tiles_meta = json.loads((tdir / "meta.json").read_text())
    meta = {
        **prov,
        "slide_id": rec.slide_id,
        "slide_path": rec.path,
        "num_patches": int(features.shape[0]),
        "shape": list(features.shape),
        "scales_mpp": tiles_meta["tiling"]["scales_mpp"],
        "tiles_dir": str(tdir),
        "packages": _versions(),
    }
    with atomic_dir(target, f"the feature store entry of slide '{rec.slide_id}'") as tmp:
        np.save(tmp / "features.npy", features)
        np.save(tmp / "coords.npy", np.load(tdir / "coords.npy"))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
    logger.info("encoded %s (%d patches) -> %s", rec.slide_id, features.shape[0], target.name)
