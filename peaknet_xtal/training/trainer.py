"""The training loop shared by supervised training and distillation.

One process per rank.  On CPU, ranks talk over gloo and the model is wrapped in
DistributedDataParallel; with CUDA the model is sharded with FSDP.  Each rank draws its slice of the
global batch by sample id (see ``data.StepSampler``), so a run with W ranks of batch b computes the
same gradients as one process with batch W*b.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from peaknet_xtal.progress import Progress

log = logging.getLogger(__name__)

#: ``loss_fn(logits, batch) -> (sum over valid pixels, number of valid pixels)``: the loop divides
#: by the valid count over all ranks, so W ranks compute exactly the loss of one big batch.
LossFn = Callable[[Any, dict[str, Any]], tuple[Any, Any]]

TRAIN_DEFAULTS: dict[str, Any] = {
    "out": "runs/train",
    "seed": 0,
    "threads": 2,
    "device": "auto",        # auto | cpu | cuda
    "precision": "auto",     # auto (bf16 where the GPU has it) | bf16 | fp32
    "model": {"name": "default", "overrides": {}, "init": None},
    "data": {"source": "sim", "paths": [], "sim": {}, "crop": 128, "peak_bias": 0.8,
             "workers": 0, "augment": {}},
    "optim": {"lr": 2e-3, "weight_decay": 0.05, "betas": [0.9, 0.95], "batch_size": 8,
              "accum": 1, "clip": 1.0},
    "schedule": {"steps": 1000, "warmup": 50, "min_lr_ratio": 0.01},
    "checkpoint": {"every": 100, "keep": 2, "resume": True},
    "dist": {"world_size": 1},
    "log_every": 10,
    "stop_after": None,      # stop (after checkpointing) at this step: tests and time-boxed runs
}
#: Types of the settings whose default (None) cannot say it (config.resolve validates them).
TRAIN_TYPES: dict[str, Any] = {"model.init": str | None, "stop_after": int | None}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch(config: dict[str, Any], dataset: Any, loss_fn: LossFn) -> Path:
    """Run training on ``dist.world_size`` processes (spawned here unless under torchrun)."""
    world = int(config["dist"].get("world_size", 1))
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return run_rank(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), config,
                        dataset, loss_fn)
    if world <= 1:
        return run_rank(0, 1, config, dataset, loss_fn)
    import torch.multiprocessing as mp

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    mp.spawn(_spawned, args=(world, config, dataset, loss_fn), nprocs=world, join=True)
    return Path(config["out"]) / "model.safetensors"


def _spawned(rank: int, world: int, config: dict[str, Any], dataset: Any,
             loss_fn: LossFn) -> None:
    run_rank(rank, world, config, dataset, loss_fn)


def _device(config: dict[str, Any]) -> Any:
    import torch

    wanted = config.get("device", "auto")
    if wanted == "auto":
        wanted = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(wanted)


def _use_bf16(config: dict[str, Any], device: Any) -> bool:
    import torch

    precision = config.get("precision", "auto")
    if precision == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return precision == "bf16"


class _Run:
    """Model, optimiser, scheduler and the (possibly distributed) wrapper of one rank."""

    def __init__(self, rank: int, world: int, config: dict[str, Any]) -> None:
        import torch

        from peaknet_xtal.model import create_model, load_model
        from peaknet_xtal.model.zoo import build_from_config
        from peaknet_xtal.training.schedule import cosine_with_warmup

        self.rank, self.world, self.config = rank, world, config
        self.device = _device(config)
        torch.manual_seed(int(config["seed"]))  # identical initial weights on every rank
        model_cfg = config["model"]
        if model_cfg.get("init"):
            # fine-tuning: the saved model's weights, with ``overrides`` applied to its config
            # (e.g. a new input normalisation for the same architecture)
            start = load_model(model_cfg["init"])
            config_now = {**start.config, **(model_cfg.get("overrides") or {})}
            self.model = build_from_config(config_now)
            self.model.load_state_dict(start.state_dict())
            self.model.train()
        else:
            self.model = create_model(model_cfg["name"], **(model_cfg.get("overrides") or {}))
        self.model.to(self.device)
        self.fsdp = world > 1 and self.device.type == "cuda"
        self.wrapped = self._wrap()
        optim = config["optim"]
        self.optimizer = torch.optim.AdamW(self.wrapped.parameters(), lr=float(optim["lr"]),
                                           weight_decay=float(optim["weight_decay"]),
                                           betas=tuple(optim["betas"]))
        sched = config["schedule"]
        self.scheduler = cosine_with_warmup(self.optimizer, int(sched["warmup"]),
                                            int(sched["steps"]), float(sched["min_lr_ratio"]))
        self.step = 0

    def _wrap(self) -> Any:
        if self.world <= 1:
            return self.model
        if self.fsdp:
            from torch.distributed.fsdp import FullyShardedDataParallel
            from torch.distributed.fsdp.wrap import ModuleWrapPolicy

            from peaknet_xtal.model.layers import BiFPNBlock, ConvNeXtV2Block

            return FullyShardedDataParallel(
                self.model, device_id=self.device,
                auto_wrap_policy=ModuleWrapPolicy({ConvNeXtV2Block, BiFPNBlock}))
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(self.model)

    def full_state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(model weights, optimiser state), gathered in full when sharded."""
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
                get_optimizer_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return (get_model_state_dict(self.wrapped, options=opts),
                    get_optimizer_state_dict(self.wrapped, self.optimizer, options=opts))
        return self.model.state_dict(), self.optimizer.state_dict()

    def restore(self, checkpoint: Path) -> None:
        import torch

        from peaknet_xtal.training.checkpoint import load_state, load_weights

        state = load_state(checkpoint)
        weights = load_weights(checkpoint)
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.wrapped, weights, options=opts)
            set_optimizer_state_dict(self.wrapped, self.optimizer, state["optimizer"],
                                     options=opts)
        else:
            self.model.load_state_dict(weights)
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"][self.rank % len(state["rng"])])
        self.step = int(state["step"])

    def save(self, out: Path) -> None:
        import torch
        import torch.distributed as dist

        from peaknet_xtal.training.checkpoint import save_checkpoint

        weights, optim_state = self.full_state()
        rng = torch.get_rng_state()
        if self.world > 1:
            gathered: list[Any] = [None] * self.world
            dist.all_gather_object(gathered, rng)
            rngs = gathered
        else:
            rngs = [rng]
        if self.rank == 0:
            save_checkpoint(out / "checkpoints", self.step, self.model,
                            {"optimizer": optim_state, "scheduler": self.scheduler.state_dict(),
                             "rng": rngs, "world_size": self.world},
                            keep=int(self.config["checkpoint"]["keep"]), weights=weights)
        if self.world > 1:
            dist.barrier()


def run_rank(rank: int, world: int, config: dict[str, Any], dataset: Any,
             loss_fn: LossFn) -> Path:
    """Train on one rank; returns the final model path (written by rank 0)."""
    import torch
    import torch.distributed as dist

    from peaknet_xtal.model import save_model
    from peaknet_xtal.training.checkpoint import latest_checkpoint

    torch.set_num_threads(max(1, int(config["threads"]) // world))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if _device(config).type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(backend, rank=rank, world_size=world)
    out = Path(config["out"])
    out.mkdir(parents=True, exist_ok=True)
    run = _Run(rank, world, config)
    if config["checkpoint"].get("resume", True):
        found = latest_checkpoint(out / "checkpoints")
        if found is not None:
            run.restore(found)
            log.info("resumed from %s at step %d", found, run.step)
    try:
        _loop(run, dataset, loss_fn, out)
        final = out / "model.safetensors"
        weights, _ = run.full_state()
        if rank == 0:
            save_model(run.model, final, extra={"steps": run.step}, state=weights)
        return final
    finally:
        if world > 1 and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def _global_count(count: Any, world: int) -> Any:
    """Valid pixels in this micro-batch summed over ranks (at least 1)."""
    count = count.detach().float()
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(count)
    return count.clamp_min(1.0)


def _loop(run: _Run, dataset: Any, loss_fn: LossFn, out: Path) -> None:
    import torch

    from peaknet_xtal.training.data import StepSampler

    cfg = run.config
    optim, sched = cfg["optim"], cfg["schedule"]
    steps, accum, batch = int(sched["steps"]), int(optim["accum"]), int(optim["batch_size"])
    stop_after = cfg.get("stop_after")
    last = min(steps, int(stop_after)) if stop_after is not None else steps
    sampler = StepSampler(run.step, last, accum, run.world, run.rank, batch)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, sampler=sampler,
                                         num_workers=int(cfg["data"].get("workers", 0)))
    bf16 = _use_bf16(cfg, run.device)
    every, log_every = int(cfg["checkpoint"]["every"]), int(cfg["log_every"])
    history = out / "history.jsonl"
    run.wrapped.train()
    micro, running = 0, 0.0
    with Progress(last, "steps", desc=f"train rank {run.rank}", enabled=run.rank == 0) as bar:
        bar.count = run.step
        for batch_data in loader:
            batch_data = {k: v.to(run.device) for k, v in batch_data.items()}
            sync = (micro == accum - 1 or run.world == 1 or run.fsdp)
            context = contextlib.nullcontext() if sync else run.wrapped.no_sync()
            with context:
                with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=bf16):
                    logits = run.wrapped(batch_data["image"], batch_data["mask"])
                total, count = loss_fn(logits, batch_data)
                loss = total / _global_count(count, run.world) / accum
                (loss * run.world).backward()  # DDP/FSDP average gradients over ranks
            running += float(loss.detach()) * run.world  # rank 0 estimate of the global loss
            micro += 1
            if micro < accum:
                continue
            grad_norm = torch.nn.utils.clip_grad_norm_(run.wrapped.parameters(),
                                                       float(optim["clip"]))
            run.optimizer.step()
            run.scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
            run.step += 1
            bar.update(1, extra=f"loss {running:.4f}")
            if run.rank == 0 and (run.step % log_every == 0 or run.step == last):
                with history.open("a") as handle:
                    handle.write(json.dumps({"step": run.step, "loss": running,
                                             "grad_norm": float(grad_norm),
                                             "lr": run.scheduler.get_last_lr()[0]}) + "\n")
            micro, running = 0, 0.0
            if run.step % every == 0 or run.step == last:
                run.save(out)
