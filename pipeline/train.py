"""The `train` stage: stream shards, train with CTC (or per-position cross-entropy), keep the best.

Runs single-process, or under `torchrun --nproc_per_node N` with DistributedDataParallel (gloo on
CPU, nccl on GPU): each rank streams its own shards, and only rank 0 writes files.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.algorithms.join import Join
from tqdm import tqdm

from pipeline import checkpoint
from pipeline.charset import Charset
from pipeline.device import autocast, pick_device, pick_precision
from pipeline.files import write_json, write_text
from pipeline.inference import predict_batches
from pipeline.models import ARCHS, build_model
from pipeline.models.layers import check_steps
from pipeline.params import Params, PipelineError
from pipeline.preprocess import Preprocess
from pipeline.shards import ShardStream, loader_workers, make_loader, read_manifest, split_shards

DEFAULT_SOURCES = {"data/manifest.parquet": 1}


@dataclass(frozen=True)
class Paths:
    model: Path = Path("models/model.pt")
    last: Path = Path("models/last.pt")
    history: Path = Path("reports/train/history.tsv")
    summary: Path = Path("reports/train.json")


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device_name != "cpu" and torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    if not cuda:  # share the cores between the ranks of this machine
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return Dist(dist.get_rank(), world, local_rank)


def lr_at(progress: float, peak: float, warmup: float) -> float:
    """One-cycle: linear warm-up from peak/25 to peak, then cosine decay to peak/1000."""
    progress = min(max(progress, 0.0), 1.0)
    if progress < warmup:
        return peak / 25 + (peak - peak / 25) * progress / warmup
    t = (progress - warmup) / (1 - warmup)
    return peak / 1000 + (peak - peak / 1000) * 0.5 * (1 + math.cos(math.pi * t))


def sequence_loss(logits: torch.Tensor, targets: torch.Tensor, lengths: torch.Tensor, ctc: bool) -> torch.Tensor:
    log_probs = logits.float().log_softmax(-1)
    if ctc:
        steps = torch.full((logits.shape[0],), logits.shape[1], dtype=torch.long)
        return F.ctc_loss(log_probs.transpose(0, 1), targets, steps, lengths.cpu(), blank=0,
                          reduction="mean", zero_infinity=True)
    # fixed positions: pad each label with class 0 ("no character") up to the model's length
    padded = torch.zeros(logits.shape[:2], dtype=torch.long, device=logits.device)
    positions = torch.arange(logits.shape[1], device=logits.device)[None, :] < lengths.to(logits.device)[:, None]
    padded[positions] = targets.to(logits.device)
    return F.nll_loss(log_probs.flatten(0, 1), padded.flatten())


def source_shards(sources: dict[str, int], split: str) -> list[tuple[str, int]]:
    """(shard, samples) of a split over all sources; training repeats each source's shards."""
    shards = []
    for manifest, repeats in sources.items():
        found = split_shards(read_manifest(Path(manifest)), split)
        shards += found * (repeats if split == "train" else 1)
    return shards


def train(params: Params, paths: Paths = Paths(), on_epoch_end: Callable[[int], None] | None = None,
          progress: bool = True) -> dict:
    tp, data, mp = params.train, params.data, params.model
    ctx = init_distributed(tp.device)
    device = pick_device(tp.device, ctx.local_rank)
    precision = pick_precision(tp.precision, device)
    torch.manual_seed(tp.seed)
    arch = ARCHS[mp.arch]
    charset = Charset(data.charset)
    settings = arch.Settings(**mp.settings)
    preprocess = Preprocess(settings.height, settings.width, settings.channels)

    model = build_model(mp.arch, mp.settings, charset.num_classes, data.max_length)
    check_steps(model, settings, data.max_length, arch.ctc)
    if tp.init_from:
        init = checkpoint.read(Path(tp.init_from))
        if init["charset"] != data.charset or init["arch"] != mp.arch or init["settings"] != mp.settings:
            raise PipelineError(f"train.init_from: {tp.init_from} was trained with arch {init['arch']!r}, "
                                f"charset {init['charset']!r}; these params differ")
        model.load_state_dict(init["state_dict"])
    # channels-last convolutions: measured 1.02x-1.22x faster training on the dev CPU (README)
    model.to(device, memory_format=torch.channels_last)

    sources = tp.sources or DEFAULT_SOURCES
    train_shards, val_shards = source_shards(sources, "train"), source_shards(sources, "val")
    if not train_shards:
        raise PipelineError(f"train: no training samples in {', '.join(sources)}")
    n_train = sum(n for _, n in train_shards)
    steps_per_epoch = math.ceil(n_train / (ctx.world * tp.batch_size))
    total_steps = tp.epochs * steps_per_epoch

    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.ndim == 1 else decay).append(p)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": tp.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=tp.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    state = {"epoch": 0, "step": 0, "best": -1.0, "best_epoch": 0, "history": [], "images": 0, "seconds": 0.0}
    if tp.resume and paths.last.exists():
        last = checkpoint.read(paths.last)
        if last["arch"] != mp.arch or last["settings"] != mp.settings or last["charset"] != data.charset:
            raise PipelineError(f"train.resume: {paths.last} belongs to other model params; delete it")
        model.load_state_dict(last["state_dict"])
        optimizer.load_state_dict(last["optimizer"])
        state = last["state"]
        torch.set_rng_state(last["rng"])
        if ctx.main:
            print(f"resuming after epoch {state['epoch']} from {paths.last}", file=sys.stderr)

    net = model
    if ctx.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if tp.compile:
        net = torch.compile(net)

    def transform(png, label, rng):
        return preprocess(png, rng, tp.augment), charset.encode(label)

    def eval_transform(png, label, rng):
        return preprocess(png), charset.encode(label)

    train_stream = ShardStream([s for s, _ in train_shards], transform, tp.batch_size, shuffle=True,
                               shuffle_buffer=tp.shuffle_buffer, seed=tp.seed)
    workers = loader_workers(len(train_shards), ctx.world, tp.workers, "train")
    train_loader = make_loader(train_stream, workers, pin_memory=device.type == "cuda")
    val_loader = None
    if val_shards:
        val_stream = ShardStream([s for s, _ in val_shards], eval_transform, 256)
        val_loader = make_loader(val_stream, loader_workers(len(val_shards), ctx.world, tp.workers, "val",
                                                        every_rank=False))

    # A time budget (train.max_minutes) also drives the schedule: the learning rate follows whichever
    # is further along, steps or time, so a run cut short by the budget still ends annealed. Runs
    # that finish their epochs inside the budget are step-driven, hence deterministic.
    budget = tp.max_minutes * 60
    stop_reason = "completed"
    lr = lr_at(state["step"] / total_steps, tp.lr, tp.warmup)
    for epoch in range(state["epoch"], tp.epochs):
        train_stream.set_epoch(epoch)
        net.train()
        started, images, loss_sum, batches = time.perf_counter(), 0, 0.0, 0
        bar = tqdm(total=math.ceil(n_train / ctx.world), unit="img", disable=not (progress and ctx.main),
                   desc=f"epoch {epoch + 1}/{tp.epochs}", file=sys.stderr, smoothing=0.05)
        joined = Join([net]) if ctx.world > 1 else contextlib.nullcontext()
        with joined, bar:
            for images_b, targets, lengths, _labels, _keys in train_loader:
                elapsed = state["seconds"] + time.perf_counter() - started
                done = state["step"] / total_steps  # fraction of the schedule behind us
                if budget:
                    done = max(done, elapsed / budget)
                    if elapsed >= budget and ctx.world == 1:  # under DDP, checked at the epoch's end
                        break
                lr = lr_at(done, tp.lr, tp.warmup)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                images_b = images_b.to(device, non_blocking=True, memory_format=torch.channels_last)
                with autocast(device, precision):
                    logits = net(images_b)
                loss = sequence_loss(logits, targets.to(device), lengths, arch.ctc)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if tp.grad_clip:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), tp.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                state["step"] += 1
                batches += 1
                loss_sum += loss.item()
                images += len(images_b)
                bar.update(len(images_b))
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}", refresh=False)
        seconds = time.perf_counter() - started
        images = _sum_over_ranks(images, ctx)
        val_acc = validate(model, val_loader, device, precision, charset, arch.ctc, ctx)
        state["epoch"] = epoch + 1
        state["images"] += images
        state["seconds"] += seconds
        row = {"epoch": epoch + 1, "loss": round(loss_sum / max(batches, 1), 5),
               "val_seq_accuracy": round(val_acc, 5), "lr": lr, "images_per_second": round(images / seconds, 1),
               "elapsed_s": round(state["seconds"], 1), "seconds": round(seconds, 1)}
        state["history"].append(row)
        improved = val_acc > state["best"]
        if improved:
            state["best"], state["best_epoch"] = val_acc, epoch + 1
        if ctx.main:
            print(f"epoch {epoch + 1}: loss {row['loss']:.4f}, val seq accuracy {val_acc:.4f}, "
                  f"{row['images_per_second']} img/s", file=sys.stderr)
            info = {"epoch": epoch + 1, "val_seq_accuracy": val_acc, "train": dataclasses.asdict(tp)}
            bundle = dict(model=model, arch=mp.arch, settings=mp.settings, charset=data.charset,
                          max_length=data.max_length, preprocess=preprocess, info=info)
            if improved:
                checkpoint.save(paths.model, checkpoint.checkpoint_dict(**bundle))
            checkpoint.save(paths.last, checkpoint.checkpoint_dict(
                **bundle, optimizer=optimizer.state_dict(), state=state, rng=torch.get_rng_state()))
            write_history(paths.history, state["history"])
        if on_epoch_end:
            on_epoch_end(epoch + 1)
        if tp.patience and epoch + 1 - state["best_epoch"] >= tp.patience:
            stop_reason = "patience"
            break
        if _any_rank(bool(budget) and state["seconds"] >= budget, ctx):
            stop_reason = "max_minutes"
            break

    summary = {
        "best_val_seq_accuracy": state["best"], "best_epoch": state["best_epoch"], "epochs_run": state["epoch"],
        "images_seen": state["images"], "train_seconds": round(state["seconds"], 1),
        "images_per_second": round(state["images"] / state["seconds"], 1) if state["seconds"] else 0.0,
        "device": str(device), "precision": precision, "ranks": ctx.world, "loader_workers": workers,
        "parameters": sum(p.numel() for p in model.parameters()), "stopped": stop_reason,
    }
    if ctx.main:
        write_json(paths.summary, summary)
    if ctx.world > 1:
        dist.destroy_process_group()
    return summary


def validate(model, loader, device, precision, charset, ctc, ctx: Dist) -> float:
    """Full-sequence accuracy over the val split, summed over ranks (each reads its own shards)."""
    if loader is None:
        return 0.0
    correct = total = 0
    for truth, pred, _conf, _key in predict_batches(model, loader, device, precision, charset, ctc):
        correct += truth == pred
        total += 1
    correct, total = _sum_over_ranks(correct, ctx), _sum_over_ranks(total, ctx)
    return correct / total if total else 0.0


def _sum_over_ranks(value: int, ctx: Dist) -> int:
    if ctx.world == 1:
        return value
    on = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([value], dtype=torch.long, device=on)
    dist.all_reduce(t)
    return int(t.item())


def _any_rank(flag: bool, ctx: Dist) -> bool:
    return _sum_over_ranks(int(flag), ctx) > 0


def write_history(path: Path, history: list[dict]) -> None:
    columns = list(history[0])
    lines = ["\t".join(columns)] + ["\t".join(str(row[c]) for c in columns) for row in history]
    write_text(path, "\n".join(lines) + "\n")
