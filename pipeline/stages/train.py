"""The `train` stage: stream shards, train with CTC (or per-position cross-entropy), keep the best.

Runs single-process, or under `torchrun --nproc_per_node N` with DistributedDataParallel (gloo on
CPU, nccl on GPU): each rank streams its own shards, and only rank 0 writes files.

    train()  = set_up()  ->  for each epoch: run_epoch() (train_step() per batch),
                             val_accuracy(), save_checkpoints()  ->  reports/train.json
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.join import Join
from tqdm import tqdm

from pipeline import outputs
from pipeline.charset import Charset
from pipeline.cli import command, params_option, quiet_option, run
from pipeline.data.shards import SOFT, UNLABELLED
from pipeline.data.sources import load_sources, require_shards, shards_of
from pipeline.data.stream import ShardStream, loader_workers, make_loader
from pipeline.device import autocast, pick_device, pick_precision
from pipeline.errors import ParamsError, PipelineError
from pipeline.files import check_writable, write_json, write_text
from pipeline.model import build_model, checkpoint, output_steps
from pipeline.model.ddddocr import PACKAGED_TRUNK
from pipeline.model.preprocess import Preprocess
from pipeline.model.settings import checked
from pipeline.model.transfer import carry_weights, from_packaged_trunk
from pipeline.params import Params, TrainParams, load_params
from pipeline.read.inference import predict_batches
from pipeline.read.metrics import finite_or_none
from pipeline.training.augment import Augment
from pipeline.training.consistency import Consistency, check_consistency
from pipeline.training.distill import SoftTargets, check_distill
from pipeline.training.losses import sequence_loss
from pipeline.training.self_training import SelfTraining, check_self_training
from pipeline.training.weights import parameter_groups


@dataclass(frozen=True)
class Paths:
    model: Path = outputs.MODEL
    last: Path = outputs.LAST
    history: Path = outputs.HISTORY
    summary: Path = outputs.TRAIN_SUMMARY


@dataclass(frozen=True)
class Ranks:
    """This process's place among the distributed ranks (one rank when not under torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> Ranks:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device_name != "cpu" and torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    if not cuda:  # share the cores between the ranks of this machine
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return Ranks(dist.get_rank(), world, local_rank)


def lr_at(progress: float, peak: float, warmup: float) -> float:
    """One-cycle: linear warm-up from peak/25 to peak, then cosine decay to peak/1000."""
    progress = min(max(progress, 0.0), 1.0)
    if progress < warmup:
        return peak / 25 + (peak - peak / 25) * progress / warmup
    t = (progress - warmup) / (1 - warmup)
    return peak / 1000 + (peak - peak / 1000) * 0.5 * (1 + math.cos(math.pi * t))


def make_optimizer(model: nn.Module, tp: TrainParams) -> torch.optim.Optimizer:
    """AdamW over the groups of `parameter_groups` (train.trunk_lr; no decay for 1-d weights)."""
    return torch.optim.AdamW(parameter_groups(model, tp.weight_decay, tp.trunk_lr), lr=tp.lr)


def train_step(net: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               images: torch.Tensor, targets: torch.Tensor, lengths: torch.Tensor, *, device: torch.device,
               precision: str, ctc: bool, grad_clip: float,
               extra_loss: Callable[[], torch.Tensor | None] | None = None) -> torch.Tensor:
    """One optimizer step on one batch; returns the loss. `net` may wrap the model (DDP, compile);
    `extra_loss` adds a term (train.consistency's) to the labelled loss before the backward pass."""
    images = images.to(device, non_blocking=True, memory_format=torch.channels_last)
    with autocast(device, precision):
        logits = net(images)
    loss = sequence_loss(logits, targets.to(device), lengths, ctc)
    extra = extra_loss() if extra_loss else None
    if extra is not None:
        loss = loss + extra
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return loss


@dataclass
class Run:
    """Everything one training run holds between epochs."""

    params: Params
    ranks: Ranks
    device: torch.device
    precision: str
    charset: Charset
    model: nn.Module
    net: nn.Module  # the model as stepped: wrapped in DDP and/or compiled
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    train_stream: ShardStream
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader | None
    workers: int
    n_train: int
    total_steps: int
    state: dict = field(default_factory=lambda: {"epoch": 0, "step": 0, "best": -1.0, "best_epoch": 0, "history": [],
                                                 "images": 0, "seconds": 0.0, "time_driven": False,
                                                 "first_step_s": 0.0})
    train_shards: list[str] = field(default_factory=list)  # the labelled ones, as train.sources repeats them
    n_labelled: int = 0  # samples per epoch in train_shards
    self_training: SelfTraining | None = None  # train.pseudo_rounds
    consistency: Consistency | None = None  # train.consistency
    soft_targets: SoftTargets | None = None  # train.distill


def build(params: Params, paths: Paths) -> nn.Module:
    """The model, from scratch or from train.init_from (same arch and settings; a checkpoint of
    another charset gives its trunk and the output rows of the characters both share)."""
    params = checked(params)
    mp, tp = params.model, params.train
    model = build_model(mp.arch, mp.settings, len(params.model_charset) + 1, params.label_max_length)
    if tp.init_from == PACKAGED_TRUNK:
        if mp.arch != "ddddocr" or (mp.settings.height, mp.settings.channels, mp.settings.hidden) != (64, 1, 512):
            raise ParamsError("train.init_from: ddddocr needs model.arch ddddocr with height 64, channels 1, hidden 512")
        new = from_packaged_trunk(model, params.model_charset)
    elif tp.init_from:
        source = Path(tp.init_from)
        if source.resolve() in (paths.model.resolve(), paths.last.resolve()):
            raise ParamsError(f"train.init_from: {source} is this stage's own output, which DVC deletes "
                              f"before training; copy it (e.g. to pretrained/) and fine-tune from the copy")
        init = checkpoint.read(source)
        if init["arch"] != mp.arch or init["settings"] != mp.settings_dict():
            raise ParamsError(f"train.init_from: {source} is arch {init['arch']!r} with settings {init['settings']}; "
                              f"model.arch and model.{mp.arch} must match them")
        new = carry_weights(model, init["state_dict"], init["charset"], params.model_charset, str(source))
    if tp.init_from and new:
        print(f"train.init_from: {tp.init_from}: {len(new)} characters new to it start fresh: {''.join(new)!r}",
              file=sys.stderr)
    freeze(model, tp.freeze)
    return model


def freeze(model: nn.Module, prefixes: list[str]) -> None:
    """Keep the parameters whose names start with one of `prefixes` as they are."""
    names = [name for name, _ in model.named_parameters()]
    for i, prefix in enumerate(prefixes):
        if not any(name == prefix or name.startswith(prefix + ".") for name in names):
            raise ParamsError(f"train.freeze[{i}]: no parameter of model {type(model).__name__} is named {prefix!r} "
                              f"or under it (e.g. {names[0]!r})")
    for name, parameter in model.named_parameters():
        if any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes):
            parameter.requires_grad_(False)


def set_up(params: Params, ranks: Ranks, paths: Paths) -> Run:
    tp, mp = params.train, params.model
    device = pick_device(tp.device, "train.device", ranks.local_rank)
    precision = pick_precision(tp.precision, device, "train.precision")
    torch.manual_seed(tp.seed)
    charset = Charset(params.model_charset)
    preprocess = Preprocess.of(mp.settings)
    model = build(params, paths)
    # channels-last convolutions: measured 1.02x-1.22x faster training on the dev CPU (docs/benchmarks.md)
    model.to(device, memory_format=torch.channels_last)

    sources = load_sources(tp.sources)
    train_shards, val_shards = require_shards(sources, "train", "train"), shards_of(sources, "val")
    unlabelled_shards = [shard for shard, _ in shards_of(sources, UNLABELLED)]
    if tp.pseudo_rounds:
        check_self_training(tp, ranks.world, val_shards, unlabelled_shards)
    if tp.consistency:
        check_consistency(tp, ranks.world, val_shards, unlabelled_shards)
    soft_shards = [shard for shard, _ in shards_of(sources, SOFT)]
    if tp.distill:
        check_distill(ranks.world, soft_shards)
    n_train = sum(n for _, n in train_shards)
    total_steps = tp.epochs * math.ceil(n_train / (ranks.world * tp.batch_size))
    optimizer = make_optimizer(model, tp)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    state = resume_state(params, paths, model, optimizer, ranks) if tp.resume and paths.last.exists() else None

    net = model
    if ranks.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if tp.compile:
        net = torch.compile(net)

    augment = Augment.of(tp)

    def train_transform(png, label, augment_rng):
        return preprocess(png, augment.draw(augment_rng)), charset.encode(label)

    def val_transform(png, label, augment_rng):
        return preprocess(png), charset.encode(label)

    train_stream = ShardStream([s for s, _ in train_shards], train_transform, tp.batch_size, shuffle=True,
                               shuffle_buffer=tp.shuffle_buffer, seed=tp.seed)
    workers = loader_workers(len(train_shards), ranks.world, tp.workers, "train")
    train_loader = make_loader(train_stream, workers, pin_memory=device.type == "cuda")
    val_loader = None
    if val_shards:
        val_stream = ShardStream([s for s, _ in val_shards], val_transform, 256)
        val_loader = make_loader(val_stream, loader_workers(len(val_shards), ranks.world, tp.workers, "val",
                                                        every_rank=False))
    run = Run(params, ranks, device, precision, charset, model, net, optimizer, scaler, train_stream,
              train_loader, val_loader, workers, n_train, total_steps,
              train_shards=[s for s, _ in train_shards], n_labelled=n_train)
    if tp.consistency:
        run.consistency = Consistency(tp, unlabelled_shards, preprocess, charset, mp.ctc, tp.workers)
    if tp.distill:
        steps = output_steps(mp.arch, mp.settings, params.label_max_length)
        run.soft_targets = SoftTargets(tp, soft_shards, preprocess, steps, tp.workers)
    if tp.pseudo_rounds:
        run.self_training = SelfTraining(tp, unlabelled_shards, Path(tempfile.mkdtemp(prefix="pseudo-")))
    if state is not None:
        run.state = {"time_driven": False, "first_step_s": 0.0, **state}
    return run


def resume_state(params: Params, paths: Paths, model: nn.Module, optimizer, ranks: Ranks) -> dict:
    """Weights, optimizer, progress and random state from models/last.pt (train.resume)."""
    last = checkpoint.read(paths.last)
    mp = params.model
    if last["arch"] != mp.arch or last["settings"] != mp.settings_dict() or last["charset"] != params.model_charset:
        raise PipelineError(f"train.resume: {paths.last} belongs to other model params; delete it")
    model.load_state_dict(last["state_dict"])
    optimizer.load_state_dict(last["optimizer"])
    torch.set_rng_state(last["rng"])
    if ranks.main:
        print(f"resuming after epoch {last['state']['epoch']} from {paths.last}", file=sys.stderr)
    return last["state"]


def run_epoch(run: Run, epoch: int, progress: bool) -> dict:
    """Train one epoch (or until the time budget is spent); returns its loss and counts.

    A time budget (train.max_minutes) can also drive the schedule, so that a run cut short by the
    budget still ends annealed: once the run is projected to overrun its budget, the learning rate
    follows whichever is further along, steps or time. The projection (`overruns`) is made at
    fixed steps, from the pace since the first step, so the loader's start-up does not count as
    pace and a run that clearly fits its budget is step-driven throughout, hence deterministic.
    """
    tp, state = run.params.train, run.state
    budget = tp.max_minutes * 60
    check_every = max(1, run.total_steps // tp.epochs // 10)
    run.train_stream.set_epoch(epoch)
    run.net.train()
    started, images, loss_sum, batches = time.perf_counter(), 0, 0.0, 0
    lr = lr_at(state["step"] / run.total_steps, tp.lr, tp.warmup)
    bar = tqdm(total=math.ceil(run.n_train / run.ranks.world), unit="img", disable=not (progress and run.ranks.main),
               desc=f"epoch {epoch + 1}/{tp.epochs}", file=sys.stderr, smoothing=0.05)
    joined = Join([run.net]) if run.ranks.world > 1 else contextlib.nullcontext()
    with joined, bar:
        for batch_images, targets, lengths, _labels, _keys in run.train_loader:
            elapsed = state["seconds"] + time.perf_counter() - started
            done = state["step"] / run.total_steps  # fraction of the schedule behind us
            if budget:
                if elapsed >= budget and run.ranks.world == 1:  # under DDP, checked at the epoch's end
                    break
                step = state["step"]
                if step == 1:
                    state["first_step_s"] = elapsed
                # under DDP every rank must agree: there, the projection is made at the epoch's end
                if run.ranks.world == 1 and not state["time_driven"] and (step & (step - 1) == 0 or step % check_every == 0):
                    state["time_driven"] = overruns(state, elapsed, budget, run.total_steps)
                if state["time_driven"]:
                    done = max(done, elapsed / budget)
            lr = lr_at(done, tp.lr, tp.warmup)
            for group in run.optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            loss = train_step(run.net, run.optimizer, run.scaler, batch_images, targets, lengths, device=run.device,
                              precision=run.precision, ctc=run.params.model.ctc, grad_clip=tp.grad_clip,
                              extra_loss=extra_losses(run))
            state["step"] += 1
            batches += 1
            loss_sum += loss.item()
            images += len(batch_images)
            bar.update(len(batch_images))
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}", refresh=False)
    return {"seconds": time.perf_counter() - started, "images": _sum_over_ranks(images, run.ranks),
            "loss": loss_sum / max(batches, 1), "lr": lr}


def extra_losses(run: Run) -> Callable[[], torch.Tensor | None] | None:
    """The terms beside the labelled loss: train.consistency's and train.distill's."""
    terms = []
    if run.consistency:
        terms.append(lambda: run.consistency.loss(run.net, run.model, run.device, run.precision))
    if run.soft_targets:
        terms.append(lambda: run.soft_targets.loss(run.net, run.device, run.precision))
    if not terms:
        return None

    def total():
        values = [v for v in (term() for term in terms) if v is not None]
        return sum(values) if values else None

    return total


def overruns(state: dict, elapsed: float, budget: float, total_steps: int) -> bool:
    """Whether the run, at its pace since its first step, would end after its time budget."""
    step, first = state["step"], state.get("first_step_s", 0.0)
    return step >= 2 and first + (elapsed - first) / (step - 1) * (total_steps - 1) > budget


def val_readings(run: Run) -> list[tuple[str, str, float]]:
    """(truth, reading, confidence) over this rank's share of the val split."""
    if run.val_loader is None:
        return []
    return [(truth, pred, conf) for truth, pred, conf, _key in predict_batches(
        run.model, run.val_loader, run.device, run.precision, run.charset, run.params.model.ctc)]


def val_accuracy(readings: list[tuple[str, str, float]], ranks: Ranks) -> float:
    """Full-sequence accuracy over the val split, summed over ranks (each reads its own shards)."""
    correct = _sum_over_ranks(sum(truth == pred for truth, pred, _ in readings), ranks)
    total = _sum_over_ranks(len(readings), ranks)
    return correct / total if total else 0.0


def self_training_round(run: Run, readings: list[tuple[str, str, float]]) -> None:
    """Label the unlabelled samples the model reads confidently; train on them from the next epoch."""
    tp = run.params.train
    shard, record = run.self_training.round(run.model, readings, run.val_loader.dataset.transform, run.device,
                                            run.precision, run.charset, run.params.model.ctc, run.state["epoch"])
    shards = run.train_shards + ([str(shard)] if shard else [])
    run.train_stream.shards = shards  # read from the next epoch on, by the workers started then
    run.train_loader = make_loader(run.train_stream, min(run.workers, len(shards)), pin_memory=run.device.type == "cuda")
    run.n_train = run.n_labelled + record["pseudo_labels"]
    remaining = tp.epochs - run.state["epoch"]
    run.total_steps = run.state["step"] + remaining * math.ceil(run.n_train / tp.batch_size)
    run.state["seconds"] += record["seconds"]  # self-training spends the training budget
    print("self-training: {pseudo_labels} of {unlabelled} unlabelled captchas read at confidence >= "
          "{threshold} join training ({seconds} s)".format(**record), file=sys.stderr)


def save_checkpoints(run: Run, paths: Paths, epoch: int, val_acc: float, improved: bool) -> None:
    """models/model.pt when val improved; models/last.pt (with optimizer and progress) always."""
    params = run.params
    info = {"epoch": epoch, "val_seq_accuracy": val_acc, "train": dataclasses.asdict(params.train)}
    model_fields = dict(arch=params.model.arch, settings=params.model.settings_dict(),
                        charset=params.model_charset, max_length=params.label_max_length, info=info)
    if improved:
        checkpoint.save(paths.model, checkpoint.contents(run.model, **model_fields))
    checkpoint.save(paths.last, checkpoint.contents(
        run.model, **model_fields, optimizer=run.optimizer.state_dict(), state=run.state, rng=torch.get_rng_state()))
    write_history(paths.history, run.state["history"])


def train(params: Params, paths: Paths = Paths(), on_epoch_end: Callable[[int], None] | None = None,
          progress: bool = True) -> dict:
    params = checked(params)  # model settings, checked by their architecture
    tp = params.train
    ranks = init_distributed(tp.device)
    if ranks.main:  # a folder that cannot take the checkpoints fails now, not after an epoch
        check_writable(*{p.parent for p in (paths.model, paths.last, paths.history, paths.summary)})
    run = set_up(params, ranks, paths)
    state, stop_reason = run.state, "completed"
    for epoch in range(state["epoch"], tp.epochs):
        result = run_epoch(run, epoch, progress)
        readings = val_readings(run)
        val_acc = val_accuracy(readings, ranks)
        if run.consistency:
            run.consistency.choose_threshold(readings)
        state["epoch"] = epoch + 1
        state["images"] += result["images"]
        state["seconds"] += result["seconds"]
        if tp.max_minutes and not state["time_driven"]:
            state["time_driven"] = _any_rank(overruns(state, state["seconds"], tp.max_minutes * 60, run.total_steps), ranks)
        row = {"epoch": epoch + 1, "loss": round(result["loss"], 5), "val_seq_accuracy": round(val_acc, 5),
               "lr": result["lr"], "images_per_second": round(result["images"] / result["seconds"], 1),
               "elapsed_s": round(state["seconds"], 1), "seconds": round(result["seconds"], 1)}
        state["history"].append(row)
        # without a val split there is nothing to choose by: the latest weights are the best known
        improved = val_acc > state["best"] or run.val_loader is None
        if improved:
            state["best"], state["best_epoch"] = val_acc, epoch + 1
        if ranks.main:
            print(f"epoch {epoch + 1}: loss {row['loss']:.4f}, val seq accuracy {val_acc:.4f}, "
                  f"{row['images_per_second']} img/s", file=sys.stderr)
            save_checkpoints(run, paths, epoch + 1, val_acc, improved)
        if on_epoch_end:
            on_epoch_end(epoch + 1)
        if run.self_training and run.self_training.due(state["epoch"], state["seconds"]):
            self_training_round(run, readings)
        if tp.patience and epoch + 1 - state["best_epoch"] >= tp.patience:
            stop_reason = "patience"
            break
        if _any_rank(bool(tp.max_minutes) and state["seconds"] >= tp.max_minutes * 60, ranks):
            stop_reason = "max_minutes"
            break

    summary = {
        "best_val_seq_accuracy": state["best"], "best_epoch": state["best_epoch"], "epochs_run": state["epoch"],
        "images_seen": state["images"], "train_seconds": round(state["seconds"], 1),
        "images_per_second": round(state["images"] / state["seconds"], 1) if state["seconds"] else 0.0,
        "device": str(run.device), "precision": run.precision, "ranks": ranks.world, "loader_workers": run.workers,
        "parameters": sum(p.numel() for p in run.model.parameters()), "stopped": stop_reason,
        "pseudo_rounds": run.self_training.rounds if run.self_training else [],
        "distill": {"soft_targets_read": run.soft_targets.read} if run.soft_targets else {},
        "consistency": {"unlabelled_read": run.consistency.seen, "used_as_targets": run.consistency.used,
                        "last_threshold": finite_or_none(run.consistency.threshold)} if run.consistency else {},
    }
    if run.self_training:
        shutil.rmtree(run.self_training.folder, ignore_errors=True)
    if ranks.main:
        write_json(paths.summary, summary)
    if ranks.world > 1:
        dist.destroy_process_group()
    return summary


def _sum_over_ranks(value: int, ranks: Ranks) -> int:
    if ranks.world == 1:
        return value
    on = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([value], dtype=torch.long, device=on)
    dist.all_reduce(t)
    return int(t.item())


def _any_rank(flag: bool, ranks: Ranks) -> bool:
    return _sum_over_ranks(int(flag), ranks) > 0


def write_history(path: Path, history: list[dict]) -> None:
    columns = list(history[0])
    lines = ["\t".join(columns)] + ["\t".join(str(row[c]) for c in columns) for row in history]
    write_text(path, "\n".join(lines) + "\n")


@command("train")
@params_option
@quiet_option
def cli(params_path, quiet):
    """Train on the shards; write models/model.pt (best on val) and reports/train*."""
    train(load_params(params_path), progress=not quiet)


if __name__ == "__main__":  # python -m pipeline.stages.NAME, as dvc.yaml runs the stages
    run(__spec__.name)
