"""The training loop shared by supervised training and distillation.

One process per rank.  On CPU, ranks talk over gloo and the model is wrapped in
DistributedDataParallel; with CUDA the model is sharded with FSDP.  Each rank draws its slice of the
global batch by sample id (see ``data.StepSampler``), so a run with W ranks of batch b computes the
same gradients as one process with batch W*b.

A run folder holds one run.  Every checkpoint carries the settings of the run that made it and the
identity of the label files it learnt from, and a rerun resumes only a run of the same settings
(:func:`check_start`, :data:`MAY_CHANGE`) on the same files (:func:`label_identity`): otherwise
one model would be trained under two configurations, or on two data sets, while the record named
one of them.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field

from peaknet_xtal.atomic import write_text_atomic
from peaknet_xtal.config import (
    DEVICE,
    ConfigError,
    bounded,
    fields_of,
    one_of,
    setting_differences,
)
from peaknet_xtal.errors import FormatError, PeakNetError
from peaknet_xtal.model.weights_io import check_fit, tensor_shapes
from peaknet_xtal.progress import Progress
from peaknet_xtal.registry import skipped_note
from peaknet_xtal.sim.config import SimConfig, settings_types
from peaknet_xtal.stopping import STOP_SIGNALS
from peaknet_xtal.training.data import DATA_SOURCES, SIM_OPTIONS, Augment
from peaknet_xtal.training.plots import LOSS_PLOT, LossCurve

log = logging.getLogger(__name__)

#: ``loss_fn(logits, batch) -> (sum over valid pixels, number of valid pixels)``: the loop divides
#: by the valid count over all ranks, so W ranks compute exactly the loss of one big batch.
LossFn = Callable[[Any, dict[str, Any]], tuple[Any, Any]]



class TrainingDiverged(PeakNetError):
    """The loss, the gradient or the weights became NaN or infinite: the run stopped there,
    before saving anything of it (its earlier checkpoints are kept), and says at which step, at
    what learning rate, and what to change."""


TRAIN_DEFAULTS: dict[str, Any] = {
    "out": "runs/train",
    "seed": 0,
    "threads": 2,
    "device": "auto",        # auto | cpu | cuda
    "precision": "auto",     # auto (bf16 where the GPU has it) | bf16 | fp32
    "model": {"name": "default", "overrides": {}, "init": None},
    "data": {"source": "sim", "paths": [], "sim": dict(SIM_OPTIONS), "crop": 128,
             "peak_bias": 0.8, "workers": 0, "augment": {}},
    "optim": {"lr": 2e-3, "weight_decay": 0.05, "betas": [0.9, 0.95], "batch_size": 8,
              "accum": 1, "clip": 1.0},
    "schedule": {"steps": 1000, "warmup": 50, "min_lr_ratio": 0.01},
    "checkpoint": {"every": 100, "keep": 2, "resume": True},
    "dist": {"world_size": 1},
    "log_every": 10,
    "progress": True,        # the progress line on stderr (--no-progress: none)
    "stop_after": None,      # stop (after checkpointing) at this step: tests and time-boxed runs;
                             # a stopped run writes no final model (see run_rank)
}
#: ``device`` and ``precision`` values (_device and _use_bf16 read them).
#: Training arithmetic (``precision``): auto is bf16 where the GPU has it (the finding engine's
#: choices, ``finding.settings.PRECISIONS``, are another setting: inference has no "auto")
TRAIN_PRECISIONS = ("auto", "bf16", "fp32")


def _model_names() -> list[str]:
    """The registered model names, plugins' included (the zoo asks the plugin registry), looked
    up only when a name is checked (imports torch)."""
    from peaknet_xtal.model.zoo import list_models

    return list_models()


def _pair(kind: Any) -> Any:
    """Two values of ``kind`` (``[lo, hi]``, Adam's betas)."""
    return Annotated[list[kind], Field(min_length=2, max_length=2)]


_COUNT = bounded(int, ge=1)
#: Types, ranges and allowed names of the settings (config.resolve validates them before any
#: work).  Every count is at least 1: ``optim.accum: 0`` or ``schedule.steps: -5`` trained
#: nothing and still wrote a "model", ``checkpoint.every: 0`` divided by zero.  A value outside
#: its range, an unknown name (``precision: fp16`` trained in fp32, ``model.name: yoctoo`` was a
#: traceback) or an unknown key in ``data.augment`` or ``data.sim.config`` (checked against the
#: Augment and SimConfig dataclasses themselves) is one line naming the setting and what it may be.
TRAIN_TYPES: dict[str, Any] = {
    "seed": bounded(int, ge=0),  # numpy seeds samples with [seed, sample id]: no negatives
    "threads": _COUNT,
    "device": DEVICE,
    "precision": one_of(TRAIN_PRECISIONS),
    # a name no family registered names the plugins that failed to load: one may have had it
    "model.name": one_of(_model_names, note=skipped_note),
    "model.init": str | None,
    "data.source": one_of(DATA_SOURCES),
    "data.paths": list[str],
    "data.crop": _COUNT,
    "data.peak_bias": bounded(float, ge=0, le=1),
    "data.workers": bounded(int, ge=0),
    "data.augment": fields_of(Augment),
    "data.sim.geometries": list[str],
    "data.sim.gain": _pair(bounded(float, gt=0)),
    "data.sim.config": fields_of(SimConfig),
    **settings_types("data.sim.config."),  # each value's range, as peaknet-sim checks them
    "optim.lr": bounded(float, gt=0),
    "optim.weight_decay": bounded(float, ge=0),
    "optim.betas": _pair(bounded(float, ge=0, lt=1)),
    "optim.batch_size": _COUNT,
    "optim.accum": _COUNT,
    "optim.clip": bounded(float, gt=0),
    "schedule.steps": _COUNT,
    "schedule.warmup": bounded(int, ge=0),
    "schedule.min_lr_ratio": bounded(float, ge=0, le=1),
    "checkpoint.every": _COUNT,
    "checkpoint.keep": _COUNT,
    "dist.world_size": _COUNT,
    "log_every": _COUNT,
    "stop_after": bounded(int, ge=1, optional=True),
}

#: Settings a resumed run may change.  None of them changes what the model learns: where the run
#: folder is (``out``: it may be moved), the threads and device it runs on (the same arithmetic up
#: to float rounding; a checkpoint is device-independent), the data-loader workers (a sample is a
#: pure function of the seed and its id, whichever process makes it), how often it logs and saves
#: and how many checkpoints it keeps, whether it shows progress, whether it resumes, and where
#: it stops (``stop_after``: a time-boxed run is rerun without it).  Everything else is fixed
#: for the life of a run: the model and its starting weights, the data and their augmentation,
#: the optimiser, the loss, the number of ranks (the global batch is ranks x batch size) and the
#: precision.  So is ``schedule.steps``: the cosine schedule is drawn over it, so a run extended
#: mid-way follows a learning-rate curve neither the old nor the new setting describes; train
#: longer by starting a new run (another --out) from the finished model with ``model.init``.
MAY_CHANGE = frozenset({"out", "threads", "device", "data.workers", "log_every", "progress",
                        "checkpoint.every", "checkpoint.keep", "checkpoint.resume", "stop_after"})


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch(config: dict[str, Any], dataset: Any, loss_fn: LossFn) -> Path:
    """Run training on ``dist.world_size`` processes (spawned here unless under torchrun).

    Returns the final model (``OUT/model.safetensors``) of a run that reached
    ``schedule.steps``; a run stopped before by ``stop_after`` returns the checkpoint it stopped
    at instead (see :func:`run_rank`)."""
    world = int(config["dist"].get("world_size", 1))
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return run_rank(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), config,
                        dataset, loss_fn)
    if world <= 1:
        return run_rank(0, 1, config, dataset, loss_fn)
    import torch.multiprocessing as mp

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    try:
        mp.spawn(_spawned, args=(world, config, dataset, loss_fn), nprocs=world, join=True)
    except mp.ProcessRaisedException as exc:  # a rank's error comes back as its traceback
        raise _ours(str(exc)) or exc from None
    from peaknet_xtal.training.checkpoint import checkpoint_step, latest_checkpoint

    out = Path(config["out"])
    step = checkpoint_step(latest_checkpoint(out / "checkpoints"))
    return _result(out, step, int(config["schedule"]["steps"]))


def _ours(text: str) -> PeakNetError | None:
    """Our own error from the traceback text torch gives for a spawned rank's exception (one
    line, as the command prints it), or None for anyone else's."""
    last = text.strip().splitlines()[-1] if text.strip() else ""
    name, _, message = last.partition(": ")
    if not name.startswith("peaknet_xtal."):
        return None
    return (TrainingDiverged if name.endswith(".TrainingDiverged") else PeakNetError)(message)


def _result(out: Path, step: int, steps: int) -> Path:
    """What a run that ended at ``step`` of ``steps`` leaves as its result: the final model, or
    the checkpoint a stopped run resumes from."""
    if step >= steps:
        return out / "model.safetensors"
    return out / "checkpoints" / f"step_{step:06d}"


def _spawned(rank: int, world: int, config: dict[str, Any], dataset: Any,
             loss_fn: LossFn) -> None:
    run_rank(rank, world, config, dataset, loss_fn)


def _device(config: dict[str, Any]) -> Any:
    """The torch device ``device`` names (``auto``: CUDA where torch sees a GPU); a CUDA device
    on a machine without one is a ConfigError, not a failure deep inside the first step."""
    from peaknet_xtal.finding.engine import resolve_device

    try:
        return resolve_device(config.get("device", "auto"))
    except (ValueError, RuntimeError) as exc:
        raise ConfigError(None, f"device: {exc}") from None


def _plain(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` as JSON has it (tuples as lists, paths as text): as a checkpoint stores it."""
    plain: dict[str, Any] = json.loads(json.dumps(config, default=str))
    return plain


def label_identity(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A label file's identity: resolved path, size and modification time (ns).  Not a content
    hash: label files run to many GB, and a hash would read them all again at every rerun, which
    resumes a run and must be quick; stream2labels, like any writer, changes the time (and mostly
    the size) whenever it writes a file, so a new file of the same name is seen.  Shared by
    peaknet-train's resume check and peaknet-distill's teacher-logits cache, so that both see
    the same change."""
    resolved = Path(path).resolve()
    try:
        stat = resolved.stat()
    except OSError as exc:
        raise FormatError(path, f"cannot read the label file: {exc.strerror or exc}") from exc
    return {"path": str(resolved), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def label_identities(config: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The :func:`label_identity` of every label file the run reads (``data.paths`` when
    ``data.source`` is labels; none for simulated data, made afresh from the settings)."""
    data = config["data"]
    if data.get("source") != "labels":
        return []
    return [label_identity(path) for path in data.get("paths") or []]


def _when(ns: int, other: int) -> str:
    """A modification time as a reader compares it: to the second, finer only where two times
    differ within one second."""
    spec = "seconds" if ns // 10**9 != other // 10**9 else "microseconds"
    return datetime.datetime.fromtimestamp(ns / 1e9).isoformat(sep=" ", timespec=spec)


def label_changes(old: list[Any], new: list[dict[str, Any]]) -> list[str]:
    """What differs between the label files a run (or a cache) was made from, ``old``, and those
    there now, ``new`` (:func:`label_identity` entries), one phrase per file naming it and what
    changed; empty when nothing did."""
    was = [entry for entry in old if isinstance(entry, dict)]
    if [e.get("path") for e in was] != [e["path"] for e in new]:
        return [f"label files were {[e.get('path') for e in was]}, now {[e['path'] for e in new]}"]
    changes = []
    for before, now in zip(was, new, strict=True):  # the same paths, checked above
        what = []
        if before.get("size") != now["size"]:
            what.append(f"size {before.get('size')} -> {now['size']} bytes")
        then, mtime = before.get("mtime_ns"), now["mtime_ns"]
        if not isinstance(then, int):
            what.append("its modification time was not recorded")
        elif then != mtime:
            what.append(f"modified {_when(then, mtime)} -> {_when(mtime, then)}")
        if what:
            changes.append(f"label file {now['path']} changed ({', '.join(what)})")
    return changes


def _stored_run(checkpoint: Path) -> dict[str, Any]:
    """What the run that wrote ``checkpoint`` stored of itself: ``config`` (its settings) and
    ``labels`` (its label files' identities), each None for a checkpoint made before it was
    stored.  The state file is memory-mapped, so its tensors (the optimiser's moments, twice the
    model's size) are not read to get at them."""
    import torch

    path = checkpoint / "state.pt"  # latest_checkpoint has checked it lies inside the folder
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # UnpicklingError for forbidden globals; anything for garbage
        raise FormatError(path, "cannot read training state (only tensors and plain values are "
                                f"accepted): {str(exc).splitlines()[0][:300]}") from exc
    stored: dict[str, Any] = {}
    for key, kind, what in (("config", dict, "run settings"), ("labels", list, "label files")):
        text = state.get(key) if isinstance(state, dict) else None
        if not isinstance(text, str):
            stored[key] = None
            continue
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise FormatError(path, f"the stored {what} are not JSON ({exc})") from exc
        stored[key] = value if isinstance(value, kind) else None
    return stored


def resolve_model_name(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with ``model.name`` saying what the run trains.  Fine-tuning (``model.init``)
    trains the init model's architecture whatever ``model.name`` says, and a record naming
    another (``yocto`` for a ``student-atto-b2``) misleads whoever reads it: so a name left at
    its default becomes the init model's, and a name the user gave that differs from it is a
    ConfigError naming both (the default cannot be told from the same name typed, so it is
    taken as "not given").  Idempotent: the launch, the CLIs and :func:`check_start` may each
    call it."""
    from peaknet_xtal.model.weights_io import checked_weights, read_config

    model_cfg = config["model"]
    init = model_cfg.get("init")
    if not init:
        return config
    weights = checked_weights(init)
    trained = read_config(weights).get("name")
    name = model_cfg.get("name")
    if name == trained:
        return config
    if name != TRAIN_DEFAULTS["model"]["name"]:
        if not isinstance(trained, str):
            raise ConfigError(None, f"model.name: {name!r}, but model.init {init} records no "
                                    "model name to check it against: leave model.name out to "
                                    "fine-tune that model as it is")
        raise ConfigError(None, f"model.name: {name!r}, but model.init {init} is a {trained!r} "
                                "model and fine-tuning trains its architecture: name "
                                f"{trained!r} or leave model.name out, or drop model.init to "
                                f"train a new {name!r}")
    if not isinstance(trained, str):
        return config
    return {**config, "model": {**model_cfg, "name": trained}}


def check_start(config: dict[str, Any]) -> Path | None:
    """Whether ``config["out"]`` can take this run, before anything is written there; returns
    the checkpoint it will resume from (None: a fresh start).

    Errors (each a PeakNetError naming the folder, file or setting): ``out`` is a file; the device
    cannot be used; ``model.init`` is not a model, is of another architecture than ``model.name``
    (:func:`resolve_model_name`), or ``model.overrides`` names a setting the architecture does
    not take; the folder holds checkpoints and ``checkpoint.resume`` is false (starting afresh
    beside them would mix two runs' checkpoints, and pruning would delete the new ones); the
    folder's latest checkpoint was made with other settings (outside :data:`MAY_CHANGE`), listed
    with both values, or from label files that changed since (another file copied over one of
    the same name: one model would learn two data sets), each named with what changed.  The
    folder is left exactly as it was.
    """
    from peaknet_xtal.training.checkpoint import latest_checkpoint

    out = Path(config["out"])
    if out.exists() and not out.is_dir():
        raise FormatError(out, "is a file, not a folder: out (--out) names the run's folder")
    _device(config)
    config = resolve_model_name(config)
    _check_model(config)
    found = latest_checkpoint(out / "checkpoints")
    if found is None:
        return None
    if not config["checkpoint"].get("resume", True):
        raise FormatError(out, f"holds a run's checkpoints (latest {found.name}) and "
                               "checkpoint.resume is false: choose another --out, or delete "
                               f"{out} to start afresh")
    stored = _stored_run(found)
    if stored["config"] is None:
        log.warning("%s was made before checkpoints stored their run's settings: resuming "
                    "without comparing them", found)
        return found
    differences = setting_differences(stored["config"], _plain(config), MAY_CHANGE)
    if differences:
        raise FormatError(out, f"holds another run ({found.name}) made with other settings: "
                               f"{'; '.join(differences)}.  Resuming it would train one model "
                               "under two configurations: choose another --out, or delete "
                               f"{out} to start afresh")
    if stored["labels"] is None:
        log.warning("%s was made before checkpoints stored their label files' identity: "
                    "resuming without checking that the files are those it learnt from", found)
        return found
    changes = label_changes(stored["labels"], label_identities(config))
    if changes:
        raise FormatError(out, f"holds a run ({found.name}) trained on other data: "
                               f"{'; '.join(changes)}.  Resuming it would train one model on "
                               f"two data sets: choose another --out, or delete {out} to "
                               "start afresh")
    return found


def _build(builder: Callable[..., Any], spec: Any, overrides: Mapping[str, Any],
           setting: str, **kwargs: Any) -> Any:
    """``builder(spec, **kwargs)``; an override the architecture does not take is a
    ConfigError naming ``model.overrides``, not a TypeError traceback, and a plugin's model
    that breaks the hook contract (``model.zoo.check_contract``) one naming ``setting`` (the
    model asked for) with the zoo's message, which names the plugin."""
    from peaknet_xtal.registry import PluginError

    try:
        return builder(spec, **kwargs)
    except PluginError as exc:
        raise ConfigError(None, f"{setting}: {exc}") from None
    except (TypeError, KeyError, ValueError) as exc:
        raise ConfigError(None, f"model.overrides {dict(overrides)}: {exc}") from None


def _check_model(config: Mapping[str, Any]) -> None:
    """Build the model on torch's ``meta`` device (no memory, no weights; a fraction of a second
    for the largest preset), which checks a plugin's model against the hook contract the loop
    relies on (``model.zoo.check_contract``) and ``data.crop`` against the model
    (:func:`check_crop`), and, when fine-tuning, compare it with ``model.init``'s tensor shapes
    (read from the file's header), so that an override the architecture does not take, or one
    that changes it, fails before any work."""
    import torch
    from safetensors import safe_open

    from peaknet_xtal.model.weights_io import checked_weights, read_config
    from peaknet_xtal.model.zoo import build_from_config, create_model

    model_cfg = config["model"]
    overrides = model_cfg.get("overrides") or {}
    with torch.device("meta"):
        if not model_cfg.get("init"):
            model = _build(create_model, model_cfg["name"], overrides, "model.name",
                           **overrides)
            check_crop(model, config["data"]["crop"], f"model {model_cfg['name']!r}")
            return
        weights = checked_weights(model_cfg["init"])
        start = read_config(weights)
        start.pop("extra", None)
        model = _build(build_from_config, {**start, **overrides}, overrides,
                       f"model.init {model_cfg['init']}")
    check_crop(model, config["data"]["crop"], f"model {model_cfg['name']!r} (model.init "
               f"{model_cfg['init']})")
    try:
        with safe_open(str(weights), "pt") as handle:
            shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise FormatError(weights, f"not a readable safetensors file: {exc}") from exc
    check_fit(tensor_shapes(model.state_dict()), shapes, model_cfg["init"],
              f"weights of another architecture than the one model.overrides {overrides} make")


def check_crop(model: Any, crop: int, what: str) -> None:
    """A ConfigError naming ``data.crop``, its value and ``what`` (the model it is for) where
    ``model`` cannot take ``crop`` x ``crop`` squares (``model.zoo.crop_problem``: the multiple
    its input sides need, and the nearest crops that are): found from the resolved settings,
    before any data are read, where a forward pass in the first step failed with a torch shape
    error."""
    from peaknet_xtal.model.zoo import crop_problem

    problem = crop_problem(model, int(crop))
    if problem is not None:
        raise ConfigError(None, f"data.crop: {crop} does not suit {what}: {problem}")


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
        # the label files as this run found them at its start: what its checkpoints learnt from
        self.labels = label_identities(config)
        self.device = _device(config)
        torch.manual_seed(int(config["seed"]))  # identical initial weights on every rank
        model_cfg = config["model"]
        overrides = model_cfg.get("overrides") or {}
        if model_cfg.get("init"):
            # fine-tuning: the saved model's weights, with ``overrides`` applied to its config
            # (e.g. a new input normalisation for the same architecture)
            start = load_model(model_cfg["init"])
            self.model = _build(build_from_config, {**start.config, **overrides}, overrides,
                                f"model.init {model_cfg['init']}")
            state = start.state_dict()
            check_fit(tensor_shapes(self.model.state_dict()), tensor_shapes(state),
                      model_cfg["init"], "weights of another architecture than the one "
                      f"model.overrides {overrides} make")
            self.model.load_state_dict(state)
            self.model.train()
        else:
            self.model = _build(create_model, model_cfg["name"], overrides, "model.name",
                                **overrides)
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

        from peaknet_xtal.model.weights_io import check_finite
        from peaknet_xtal.training.checkpoint import load_state, load_weights

        state = load_state(checkpoint)
        weights = load_weights(checkpoint)
        # a checkpoint of a diverged run (written before runs stopped at the first NaN)
        check_finite(weights, checkpoint / "model.safetensors")
        if not self.fsdp:
            check_fit(tensor_shapes(self.model.state_dict()), tensor_shapes(weights),
                      checkpoint / "model.safetensors", "weights of another architecture than "
                      f"this run's model ({self.config['model']['name']})")
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
            try:
                self.optimizer.load_state_dict(state["optimizer"])
            except (ValueError, KeyError) as exc:
                raise FormatError(checkpoint / "state.pt", "optimiser state of another model "
                                                           f"({exc})") from None
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"][self.rank % len(state["rng"])])
        self.step = int(state["step"])

    def save(self, out: Path) -> None:
        """Write the checkpoint of this step (rank 0; every rank takes part in gathering it).
        A stop asked for meanwhile waits until it is written on every rank
        (``stopping.stops_held``) and then stops the run, which resumes from it."""
        from peaknet_xtal.stopping import stops_held

        with stops_held():
            self._save(out)

    def _save(self, out: Path) -> None:
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
                             "rng": rngs, "world_size": self.world,
                             # the run's settings and label files, for check_start (JSON:
                             # loadable as plain data)
                             "config": json.dumps(_plain(self.config)),
                             "labels": json.dumps(self.labels)},
                            keep=int(self.config["checkpoint"]["keep"]), weights=weights)
        if self.world > 1:
            dist.barrier()


def run_rank(rank: int, world: int, config: dict[str, Any], dataset: Any,
             loss_fn: LossFn) -> Path:
    """Train on one rank; returns the final model path (written by rank 0).

    A run stopped by ``stop_after`` before ``schedule.steps`` writes no final model: a model
    trained on part of its learning-rate schedule is not the one the settings describe, and
    under the final name it would be taken for it (and its record would say the run is done).
    It returns the checkpoint it stopped at, which a rerun without ``stop_after`` resumes from,
    and says so on stderr.  A step whose loss, gradient or updated weights are not finite
    raises :class:`TrainingDiverged` before anything of it is saved (see ``_loop``).  Rank 0
    draws the loss curve (``OUT/loss.png``, see ``training.plots``) at every checkpoint and as
    the run ends, however it ends."""
    import torch
    import torch.distributed as dist

    from peaknet_xtal.model import save_model

    torch.set_num_threads(max(1, int(config["threads"]) // world))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if _device(config).type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(backend, rank=rank, world_size=world)
    out = Path(config["out"])
    config = resolve_model_name(config)  # checkpoints and the model say what was trained
    found = check_start(config)  # before the folder is touched
    run = _Run(rank, world, config)
    if found is not None:
        run.restore(found)
        log.info("resumed from %s at step %d", found, run.step)
    out.mkdir(parents=True, exist_ok=True)
    curve = None
    if rank == 0:
        _cut_history(out / HISTORY, run.step)
        curve = LossCurve(out / HISTORY, out / LOSS_PLOT,
                          f"{out.name}: {config['model']['name']}")
    try:
        _loop(run, dataset, loss_fn, out, curve)
        steps = int(config["schedule"]["steps"])
        final = _result(out, run.step, steps)
        if run.step < steps:  # stopped by stop_after: the checkpoint is all there is
            if rank == 0:
                print(f"stopped at step {run.step} of {steps}; no final model yet: checkpoint "
                      f"{final} is kept; rerun the same command without --stop-after (or with a "
                      "later step) to continue", file=sys.stderr)
            return final
        weights, _ = run.full_state()
        if rank == 0:
            if not _finite_weights(weights.values()):  # never a model of NaN under the final name
                raise TrainingDiverged(f"the weights at step {run.step} hold NaN or infinite "
                                       f"values; no final model was written to {final}")
            save_model(run.model, final, extra={"steps": run.step}, state=weights)
        return final
    finally:
        if curve is not None:  # however the run ends: finished, stopped, diverged, failed
            curve.draw()
        if world > 1 and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


#: The per-step log (JSON lines: step, loss, grad_norm, lr) in the run folder.
HISTORY = "history.jsonl"


def read_history(path: Path) -> list[dict[str, Any]]:
    """The entries of a history file, in order; a line that is not a JSON object (one cut short
    by a crash) is left out."""
    entries = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


def _cut_history(path: Path, step: int) -> None:
    """Keep only the history of steps up to ``step`` (the checkpoint resumed from; 0 for a fresh
    start), replaced atomically: a run interrupted after its last checkpoint logged steps it
    will train again, and they would otherwise appear twice.  A line cut short by a crash is
    dropped with them."""
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    kept = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("step"), int) \
                and entry["step"] <= step:
            kept.append(line)
    if len(kept) != len(lines):
        write_text_atomic(path, "".join(f"{line}\n" for line in kept))


def _worker_ignores_stops(worker_id: int) -> None:
    """A data-loader worker's ``worker_init_fn``: Ctrl-C and SIGTERM are the main process's
    affair, which stops the run, says what is kept and then ends its workers itself.

    Why: ``timeout``, Slurm and a terminal send the signal to the whole process group, workers
    included.  Torch's workers die of a SIGTERM from any process but their parent, and the main
    process's SIGCHLD handler then raised "DataLoader worker ... is killed by signal:
    Terminated" wherever it was: a traceback, and exit status 1 where it came before the main
    process's own stop.  So Ctrl-C is ignored here, and SIGTERM stays held (as
    :func:`_start_workers` forked the worker) and is taken by :func:`_sigterm_from_the_parent`,
    which ends the worker only where its main process sent it: the main process ends a worker
    that does not stop when asked (and multiprocessing every worker left at exit) with SIGTERM,
    and one that ignored it hung the main process.  A worker whose main process is gone still
    ends: torch's watchdog checks its parent.

    A stop that lands while the main process takes a batch's shared memory from a worker cuts
    that hand-over short, and the worker's multiprocessing handle server printed a
    BrokenPipeError or ConnectionResetError traceback beside the one line; such a lost
    connection is the stop and is not printed (any other error is, as before)."""
    if not hasattr(signal, "sigwaitinfo") or not hasattr(signal, "pthread_sigmask"):
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # macOS has no sigwaitinfo: Ctrl-C only
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_sigterm_from_the_parent, name="peaknet SIGTERM", daemon=True).start()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # one held since the fork is dropped with it
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    printed = sys.excepthook

    def quiet_lost_connections(kind: type[BaseException], value: BaseException,
                               traceback: Any) -> None:
        if not issubclass(kind, ConnectionError):
            printed(kind, value, traceback)

    sys.excepthook = quiet_lost_connections


def _sigterm_from_the_parent() -> None:
    """In a data-loader worker, where SIGTERM is held: take each one, and end the worker at
    once where its main process sent it (as torch's own handler does); one from anyone else (a
    scheduler's, to the process group) is left to the main process."""
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid == os.getppid():
            os._exit(0)


def _start_workers(loader: Any) -> Iterator[Any]:
    """``iter(loader)``, which forks the data-loader workers, with Ctrl-C and SIGTERM held back
    meanwhile: a worker inherits them held and leaves them to the main process
    (:func:`_worker_ignores_stops`), which receives them as soon as the workers exist, and
    stops.  Without this a signal to the group while workers start would kill one first."""
    if not getattr(loader, "num_workers", 0) or not hasattr(signal, "pthread_sigmask"):
        return iter(loader)
    held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _batches(loader: Any) -> Iterator[Any]:
    """The loader's batches.  An error of ours raised in a data-loader worker comes back as a
    PeakNetError with its own one-line message: torch re-raises it as a RuntimeError carrying
    the worker's whole traceback, since it cannot rebuild an error that needs a path."""
    batches = _start_workers(loader)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except RuntimeError as exc:
            lines = str(exc).strip().splitlines()
            if "DataLoader worker" in lines[0] and lines[-1].startswith("peaknet_xtal."):
                raise PeakNetError(lines[-1].split(": ", 1)[-1]) from None
            raise
        yield batch


def _global_count(count: Any, world: int) -> Any:
    """Valid pixels in this micro-batch summed over ranks (at least 1)."""
    count = count.detach().float()
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(count)
    return count.clamp_min(1.0)


def _loop(run: _Run, dataset: Any, loss_fn: LossFn, out: Path,
          curve: LossCurve | None) -> None:
    """Train from ``run.step`` to the last step, logging to the history and saving a
    checkpoint (and redrawing the loss curve, ``curve``: rank 0's) every
    ``checkpoint.every`` steps and at the last."""
    import torch

    from peaknet_xtal.training.data import StepSampler

    cfg = run.config
    optim, sched = cfg["optim"], cfg["schedule"]
    steps, accum, batch = int(sched["steps"]), int(optim["accum"]), int(optim["batch_size"])
    stop_after = cfg.get("stop_after")
    last = min(steps, int(stop_after)) if stop_after is not None else steps
    sampler = StepSampler(run.step, last, accum, run.world, run.rank, batch)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, sampler=sampler,
                                         num_workers=int(cfg["data"].get("workers", 0)),
                                         worker_init_fn=_worker_ignores_stops)
    bf16 = _use_bf16(cfg, run.device)
    every, log_every = int(cfg["checkpoint"]["every"]), int(cfg["log_every"])
    history = out / HISTORY
    run.wrapped.train()
    micro, running = 0, 0.0
    # counted against the whole schedule: a run stopped at 2 of 4 steps is not 100 % done
    with Progress(steps, "steps", desc=f"train rank {run.rank}",
                  enabled=run.rank == 0 and bool(cfg["progress"]), initial=run.step) as bar:
        for batch_data in _batches(loader):
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
            lr = float(run.scheduler.get_last_lr()[0])  # this step's
            entry = {"step": run.step + 1, "loss": running, "grad_norm": float(grad_norm),
                     "lr": lr}
            # checked on every rank alike (one all-reduce), so that all stop at the same step:
            # a NaN gradient would make every weight NaN, and one NaN weight every score
            problem = None
            norm = float(grad_norm)
            if not _agree(math.isfinite(running) and math.isfinite(norm), run):
                problem = f"the loss is {running:.4g} and the gradient norm {norm:.4g}"
            else:
                run.optimizer.step()
                if not _agree(_finite_weights(run.wrapped.parameters()), run):
                    problem = "the weights hold NaN or infinite values after the update"
            if problem is not None:
                if run.rank == 0:
                    _log_step(history, entry)
                raise _diverged(run, problem, lr, steps, out)
            run.scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
            run.step += 1
            bar.update(1, extra=f"loss {running:.4f}")
            if run.rank == 0 and (run.step % log_every == 0 or run.step == last):
                _log_step(history, {**entry, "lr": run.scheduler.get_last_lr()[0]})
            micro, running = 0, 0.0
            if run.step % every == 0 or run.step == last:
                run.save(out)
                if curve is not None:
                    curve.draw()


def _finite_weights(tensors: Iterable[Any]) -> bool:
    """Whether every floating-point tensor of ``tensors`` is free of NaN and infinity (one
    device synchronisation for all of them)."""
    import torch

    checks = [torch.isfinite(t.detach()).all() for t in tensors if t.is_floating_point()]
    return not checks or bool(torch.stack([c.to(checks[0].device) for c in checks]).all())


def _agree(ok: bool, run: _Run) -> bool:
    """``ok`` on every rank (a NaN on one rank's batch stops them all at the same step)."""
    if run.world <= 1:
        return ok
    import torch
    import torch.distributed as dist

    flag = torch.tensor([1.0 if ok else 0.0], device=run.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0)


def _log_step(history: Path, entry: Mapping[str, Any]) -> None:
    """One history line, strict JSON: a NaN or infinite number is written as null (Python's
    ``NaN`` token is no JSON, and other readers refuse the whole file)."""
    plain = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
             for k, v in entry.items()}
    with history.open("a") as handle:
        handle.write(json.dumps(plain, allow_nan=False) + "\n")


def _diverged(run: _Run, problem: str, lr: float, steps: int, out: Path) -> TrainingDiverged:
    """The error of a run whose step ``run.step + 1`` went non-finite: where, why, what is
    kept (the last checkpoint, all written before it) and what to change."""
    from peaknet_xtal.training.checkpoint import latest_checkpoint

    try:
        kept = latest_checkpoint(out / "checkpoints")
    except PeakNetError:
        kept = None
    if kept is not None:
        what = f"its last good checkpoint {kept} is kept"
        where = (f"in another --out (or delete {out}): its checkpoints hold this run's "
                 "settings, and resuming them diverges again")
    else:
        what, where = "no checkpoint had been written yet", "(the same ones diverge again)"
    optim = run.config["optim"]
    return TrainingDiverged(
        f"training diverged at step {run.step + 1} of {steps}: {problem} (learning rate "
        f"{lr:.4g} at that step); stopped before saving anything of it: {what}, and no final "
        f"model was written.  Lower optim.lr (now {float(optim['lr']):g}), or clip harder "
        f"(optim.clip, now {float(optim['clip']):g}) or warm up longer (schedule.warmup), and "
        f"train with the new settings {where}")
