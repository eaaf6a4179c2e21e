"""SimSiam self-supervised pretraining of one encoder per scale (Chen & He, CVPR 2021).

Follows the official recipe: backbone -> 3-layer projector (BN, last BN without affine) -> 2-layer
bottleneck predictor; symmetric negative cosine loss with stop-gradient on the projections; SGD with
lr = base_lr x batch / 256, momentum 0.9, weight decay 1e-4 and a cosine schedule. One ignite engine per
scale, checkpointed every epoch (resume after a kill), TensorBoard loss / lr / collapse monitor.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from monai.data import DataLoader, Dataset
from torch.utils.data import DistributedSampler
from torch import nn

from scripts.cache import atomic_write_bytes, atomic_write_json, file_sha256, stable_hash
from scripts.data.manifest import SlideRecord
from scripts.distributed import rank_world
from scripts.errors import BundleInputError
from scripts.features.encoders import build_backbone, check_state_matches, feature_dim, load_state
from scripts.workflows.handlers import OneLineErrors

logger = logging.getLogger(__name__)


class SimSiam(nn.Module):
    """SimSiam network: ``forward(x1, x2) -> (p1, p2, z1.detach(), z2.detach())``.

    Args:
        arch: backbone name (see :mod:`scripts.features.encoders`).
        dim: projection size (2048 in the paper).
        pred_dim: predictor bottleneck size (512).
    """

    def __init__(self, arch: str = "resnet50", dim: int = 2048, pred_dim: int = 512) -> None:
        super().__init__()
        self.backbone = build_backbone(arch)
        d = feature_dim(arch)
        self.projector = nn.Sequential(
            nn.Linear(d, dim, bias=False), nn.BatchNorm1d(dim), nn.ReLU(inplace=True),
            nn.Linear(dim, dim, bias=False), nn.BatchNorm1d(dim), nn.ReLU(inplace=True),
            nn.Linear(dim, dim, bias=False), nn.BatchNorm1d(dim, affine=False),
        )
        self.predictor = nn.Sequential(
            nn.Linear(dim, pred_dim, bias=False), nn.BatchNorm1d(pred_dim), nn.ReLU(inplace=True), nn.Linear(pred_dim, dim)
        )

    def forward(self, x1: torch.Tensor, x2: torch.Tensor):
        z1, z2 = self.projector(self.backbone(x1)), self.projector(self.backbone(x2))
        return self.predictor(z1), self.predictor(z2), z1.detach(), z2.detach()


def simsiam_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """Symmetric negative cosine similarity (stop-gradient already applied to ``z``); minimum -1."""
    return -0.5 * (F.cosine_similarity(p1, z2, dim=-1).mean() + F.cosine_similarity(p2, z1, dim=-1).mean())


def collapse_std(z: torch.Tensor) -> float:
    """Mean per-dimension std of the l2-normalised projections; ~1/sqrt(d) when healthy, 0 when collapsed."""
    return float(F.normalize(z.float(), dim=-1).std(dim=0).mean())


def _pretrain_one_scale(
    name: str,
    items: list[dict],
    transform: Callable,
    out_dir: Path,
    arch: str,
    epochs: int,
    batch_size: int,
    base_lr: float,
    momentum: float,
    weight_decay: float,
    seed: int,
    num_workers: int,
    device: torch.device,
    progress: bool,
    init_weights: str | None = None,
    init_prefix: str = "",
) -> Path:
    final = out_dir / "encoder.pt"
    if final.is_file():
        return final
    rank, world = rank_world()
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = SimSiam(arch)
    if init_weights:  # start from a given backbone (state dict or exported network of the same architecture)
        state = load_state(init_weights, init_prefix)
        check_state_matches(model.backbone, state, init_weights, "pass a backbone of --encoder_arch "
                            f"{arch} (and --pretrain_init_prefix, e.g. 'backbone.')")
        model.backbone.load_state_dict(state, strict=False)
        logger.info("pretrain %s: backbone starts from %s", name, init_weights)
    model = model.to(device)
    lr = base_lr * batch_size / 256  # batch_size is the global batch (split over ranks)
    if world > 1:
        if device.type == "cuda":  # SimSiam's projector / predictor batch norms need global-batch statistics
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:  # torch's SyncBatchNorm runs on GPUs only
            logger.warning("CPU ranks: batch norms use per-rank statistics (SyncBatchNorm needs GPUs)")
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    net = model.module if world > 1 else model
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 0.5 * (1 + math.cos(math.pi * e / max(epochs, 1))))
    generator = torch.Generator().manual_seed(seed)
    dataset = Dataset(items, transform)
    per_rank = max(1, batch_size // world)
    sampler = DistributedSampler(dataset, shuffle=True, seed=seed, drop_last=True) if world > 1 else None
    loader = DataLoader(dataset, batch_size=per_rank, shuffle=sampler is None, sampler=sampler,
                        drop_last=len(items) > batch_size, num_workers=num_workers, generator=generator)
    d = net.projector[-1].num_features

    def step(engine: Engine, batch: dict) -> dict:
        model.train()
        x1, x2 = batch["view1"].to(device), batch["view2"].to(device)
        p1, p2, z1, z2 = model(x1, x2)
        loss = simsiam_loss(p1, p2, z1, z2)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"SimSiam loss is {loss.item()} at iteration {engine.state.iteration} ({name})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"loss": loss.item(), "std": collapse_std(z1)}

    trainer = Engine(step)
    history: list[dict] = []

    @trainer.on(Events.EPOCH_STARTED)
    def _reset(engine):
        engine.state.epoch_stats = []
        if sampler is not None:
            sampler.set_epoch(engine.state.epoch)

    @trainer.on(Events.ITERATION_COMPLETED)
    def _collect(engine):
        engine.state.epoch_stats.append(engine.state.output)

    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(out_dir / "logs"))

    @trainer.on(Events.EPOCH_COMPLETED)
    def _epoch_end(engine):
        scheduler.step()
        stats = engine.state.epoch_stats
        local = torch.tensor([np.mean([s["loss"] for s in stats]), np.mean([s["std"] for s in stats])], dtype=torch.float64)
        if world > 1:  # epoch means over all ranks
            torch.distributed.all_reduce(local)
            local /= world
        loss, std = float(local[0]), float(local[1])
        engine.state.metrics.update(loss=loss, collapse_std=std, collapse_ratio=std * math.sqrt(d))
        history.append({"epoch": engine.state.epoch, "loss": loss, "collapse_std": std})
        if writer is None:
            return
        writer.add_scalar("pretrain/loss", loss, engine.state.epoch)
        writer.add_scalar("pretrain/collapse_std", std, engine.state.epoch)
        writer.add_scalar("pretrain/collapse_bound", 1 / math.sqrt(d), engine.state.epoch)
        writer.add_scalar("pretrain/lr", optimizer.param_groups[0]["lr"], engine.state.epoch)
        writer.flush()
        logger.info("pretrain %s epoch %d/%d: loss %.4f, output std %.4f (1/sqrt(d) = %.4f)",
                    name, engine.state.epoch, epochs, loss, std, 1 / math.sqrt(d))

    to_save = {"model": net, "optimizer": optimizer, "scheduler": scheduler, "trainer": trainer}
    # ignite's DiskSaver is distributed-aware: built on every rank (it synchronises), it writes on rank 0 only
    ckpt = Checkpoint(to_save, DiskSaver(str(out_dir / "checkpoints"), require_empty=False, atomic=True), n_saved=1,
                      filename_prefix="resume")
    trainer.add_event_handler(Events.EPOCH_COMPLETED, ckpt)
    OneLineErrors(out_dir / "checkpoints", "the SimSiam resume checkpoint").attach(trainer)  # a full disk: one line
    existing = sorted((out_dir / "checkpoints").glob("resume_*.pt")) if (out_dir / "checkpoints").is_dir() else []
    if existing:
        state = torch.load(existing[-1], map_location=device, weights_only=True)
        Checkpoint.load_objects(to_load=to_save, checkpoint=state)
        logger.info("pretrain %s: resuming after epoch %d from %s", name, trainer.state.epoch, existing[-1])
    if progress and rank == 0:
        from ignite.handlers import ProgressBar

        ProgressBar(persist=False, desc=f"pretrain {name}").attach(trainer)
    trainer.run(loader, max_epochs=epochs)
    if rank == 0:
        writer.close()
        import io

        buf = io.BytesIO()
        torch.save(net.backbone.state_dict(), buf)
        atomic_write_json(out_dir / "history.json", history)
        atomic_write_bytes(final, buf.getvalue())  # last: its presence marks the scale as done
    if world > 1:
        torch.distributed.barrier()  # the others wait for rank 0's files
    return final



def pretrain_scales(
    records: Sequence[SlideRecord],
    tiles_dirs: Sequence[Path],
    out_root: str | Path,
    transform_for_scale: Callable[[float], Callable],
    scales_mpp: Sequence[float],
    pretrain_scales_mpp: Sequence[float] | None = None,
    arch: str = "resnet50",
    epochs: int = 200,
    batch_size: int = 128,
    base_lr: float = 0.05,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    max_patches_per_slide: int = 0,
    seed: int = 0,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    init_weights: str | Sequence[str | None] | None = None,
    init_prefix: str = "",
) -> list[str | None]:
    """Pretrain one SimSiam encoder per requested scale; returns one backbone weights file per scale of
    ``scales_mpp`` (``None`` for scales not pretrained). Finished scales are cached by a hash of the
    patches and hyper-parameters (and of the starting backbone); an interrupted scale resumes from its last
    epoch. ``init_weights``: a backbone to start from (a state dict or an exported network of ``arch``; one for
    every scale, or a list with one per scale) instead of a random initialisation."""
    inits = list(init_weights) if isinstance(init_weights, (list, tuple)) else [init_weights] * len(scales_mpp)
    if len(inits) != len(scales_mpp):
        raise BundleInputError(str(init_weights), f"{len(inits)} starting backbones for {len(scales_mpp)} scales",
                               "give one file, or one per scale (null for a random start)")
    for f in inits:
        if f and not Path(f).is_file():
            raise BundleInputError(f, "starting backbone for SimSiam not found", "fix --pretrain_init_weights")
    wanted = [float(s) for s in (pretrain_scales_mpp or scales_mpp)]
    rng = np.random.default_rng(seed)
    items = []
    for rec, tdir in zip(records, tiles_dirs):
        coords = np.load(Path(tdir) / "coords.npy")
        if max_patches_per_slide and len(coords) > max_patches_per_slide:
            coords = coords[np.sort(rng.choice(len(coords), max_patches_per_slide, replace=False))]
        mpp = float(json.loads((Path(tdir) / "meta.json").read_text())["mpp"])  # as resolved when the slide was tiled
        items += [{"path": rec.path, "centre": c.astype(np.float32), "mpp": mpp, "mpp_force": True} for c in coords]
    out = []
    for s, init in zip(scales_mpp, inits):
        if float(s) not in wanted:
            out.append(None)
            continue
        spec = {"tiles": [Path(t).name for t in tiles_dirs], "scale": float(s), "arch": arch, "epochs": epochs,
                "batch": batch_size, "lr": base_lr, "momentum": momentum, "wd": weight_decay,
                "max_patches": max_patches_per_slide, "seed": seed}
        if init:  # a new starting backbone trains again (random starts keep their former cache keys)
            spec["init"] = {"sha256": file_sha256(init), "prefix": init_prefix}
        key = stable_hash(spec)
        name = f"{float(s):g}mpp"
        out_dir = Path(out_root) / f"{name}-{key}"
        atomic_write_json(Path(out_root) / f"{name}-{key}.json", {"scale_mpp": float(s), "arch": arch, "epochs": epochs,
                                                                   "batch_size": batch_size, "num_patches": len(items)})
        w = _pretrain_one_scale(name, items, transform_for_scale(float(s)), out_dir, arch, epochs, batch_size, base_lr,
                                momentum, weight_decay, seed, num_workers, torch.device(device), progress, init, init_prefix)
        out.append(str(w))
    return out


def read_history(weights: str | Path) -> list[dict]:
    """Per-epoch loss and collapse statistics saved beside a pretrained encoder."""
    return json.loads((Path(weights).parent / "history.json").read_text())
