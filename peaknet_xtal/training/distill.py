"""Knowledge distillation: teacher logits cached to HDF5 once, then a student trained on them.

The teacher (e.g. the 673M preset) is far too costly to run at every student step, so it runs once
over the training frames and its logits are stored as float16 (ample for a loss target) in
``<cache>`` with datasets ``images``, ``masks``, ``labels``, ``logits`` and ``tiles``.

Teacher and student must see the same input: the model standardises whatever it is given (median
and background spread of that input), so logits of a whole frame are not the teacher's answer for a
crop of it.  The cache therefore holds the frames cut into crop-sized tiles (the last row and column
of tiles aligned to the frame's edge, so every pixel is covered), the teacher runs on each tile
exactly as the student will see it, and the student trains on those tiles with the same
flips/rotations applied to image, mask, ground truth and logits.  The loss is the paper's
(``losses.distillation_loss``); its focal term learns the ground-truth labels of the label files.

The cache is reused only while it answers the same question: it is keyed by the teacher's content
(weights and config hashes), each label file's identity (path, size, modification time:
``trainer.label_identity``, the one peaknet-train's resume check uses too), the crop
and the layout, and rebuilt with a log line saying why when any of them changes.  Frames of any
shape (label files from several detectors) are tiled each on its own.  The file is marked as a
teacher cache, and nothing unmarked is ever written over: a ``cache`` path that names a label
file or any other file is an error naming it.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from pydantic import Field

from peaknet_xtal.atomic import atomic_path
from peaknet_xtal.config import bounded, deep_merge
from peaknet_xtal.errors import FormatError
from peaknet_xtal.progress import Progress
from peaknet_xtal.stopping import stops_held
from peaknet_xtal.training.trainer import (
    TRAIN_DEFAULTS,
    TRAIN_TYPES,
    check_crop,
    check_start,
    label_changes,
    label_identity,
    launch,
    resolve_model_name,
)

log = logging.getLogger(__name__)

DISTILL_DEFAULTS: dict[str, Any] = deep_merge(TRAIN_DEFAULTS, {
    "teacher": None,        # "default", a .safetensors file or a model directory
    "cache": None,          # default: OUT/teacher_logits.h5
    "data": {"source": "labels"},
    "loss": {"temperature": 2.0, "weights": [0.4, 0.4, 0.2]},
})
#: ``loss.weights`` are those of the MSE, KL and focal terms (none negative), ``loss.temperature``
#: the KL's softening (> 0: it divides the logits).
DISTILL_TYPES: dict[str, Any] = {
    **TRAIN_TYPES, "teacher": str | None, "cache": str | None,
    "loss.temperature": bounded(float, gt=0),
    "loss.weights": Annotated[list[bounded(float, ge=0)],  # type: ignore[misc]
                              Field(min_length=3, max_length=3)]}


#: Layout version of the cache (2: crop-sized tiles with ground-truth labels; 3: marked with
#: ``CACHE_MARK``, keyed by the teacher's and the label files' identity, frames of any shape).
CACHE_VERSION = 3
#: The attribute (name, value) that marks an HDF5 file as this project's teacher-logits cache:
#: only a file carrying it is ever replaced, so a ``cache`` setting that names a label file, a
#: simulator's truth or any other HDF5 file is refused instead of overwritten.
CACHE_MARK = ("peaknet_xtal_cache", "teacher_logits")
#: The attributes and datasets of a version-2 cache (made before ``CACHE_MARK``): recognisable
#: as a cache all the same, so a run folder from an earlier version is rebuilt, not refused.
_V2_ATTRS = {"teacher", "version", "crop"}
_V2_DATASETS = {"images", "masks", "labels", "logits", "tiles"}


def tile_origins(length: int, size: int) -> list[int]:
    """Starts of ``size``-long tiles covering ``length``: stride ``size``, the last one flush with
    the end (overlapping its neighbour) so that no pixel is left out; one tile if it is shorter."""
    if length <= size:
        return [0]
    starts = list(range(0, length - size + 1, size))
    if starts[-1] != length - size:
        starts.append(length - size)
    return starts


def teacher_identity(teacher: str) -> dict[str, str]:
    """What the teacher's logits depend on: the SHA-256 of its weights file and of its config
    (the ``.json`` beside the weights wins over the copy inside them).  Content, not path or
    time: a teacher retrained into the same path is another teacher, a copy moved elsewhere the
    same one.  ``"default"`` resolves to the shipped file, a directory to its weights.  Hashing
    reads the file once (seconds for the largest preset), little beside running it over every
    frame.  A missing or unreadable teacher is a FormatError naming it, before any work."""
    from peaknet_xtal.model.weights_io import checked_weights, model_digest, read_config

    weights = checked_weights(teacher)
    digest = model_digest(teacher)
    config = json.dumps(read_config(weights), sort_keys=True)
    return {"weights_sha256": str(digest),
            "config_sha256": hashlib.sha256(config.encode()).hexdigest()}


def check_teacher(teacher: str, crop: int) -> None:
    """``data.crop`` against the teacher (``trainer.check_crop``), which runs on crop-sized
    tiles as they are, built from its config on torch's ``meta`` device (no memory, no
    weights): a crop it does not take failed during the teacher pass, after the label files
    were read, as a torch shape error."""
    import torch

    from peaknet_xtal.model.weights_io import build_model, checked_weights, read_config

    weights = checked_weights(teacher)
    with torch.device("meta"):
        model = build_model(read_config(weights), weights)
    check_crop(model, crop, f"the teacher {teacher}")


def _why_stale(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Why a cache made under key ``old`` does not answer ``new``, in words (empty: it does)."""
    reasons = []
    if old.get("version") != new["version"]:
        reasons.append(f"cache layout version {old.get('version')}, now {new['version']}")
    if old.get("crop") != new["crop"]:
        reasons.append(f"made for crop {old.get('crop')}, now {new['crop']}")
    was = old.get("teacher") or {}
    changed = [name for name in ("weights", "config")
               if was.get(f"{name}_sha256") != new["teacher"][f"{name}_sha256"]]
    if changed:
        reasons.append(f"the teacher's {' and '.join(changed)} changed")
    labels = old.get("labels")
    reasons.extend(label_changes(labels if isinstance(labels, list) else [], new["labels"]))
    return reasons


def _cache_state(cache: Path, key: dict[str, Any], n_tiles: int) -> str | None:
    """None if ``cache`` holds the logits for ``key``; else why it is to be rebuilt.  A file
    that is not recognisably this project's teacher cache is a FormatError: it is never
    replaced, whatever it holds."""
    import h5py

    refuse = ("exists and is not a peaknet-distill teacher-logits cache; refusing to replace it "
              "(set 'cache' to another path, or move the file)")
    if not cache.is_file():
        raise FormatError(cache, refuse)
    try:
        handle = h5py.File(cache, "r")
    except OSError as exc:
        raise FormatError(cache, refuse) from exc
    with handle:
        attrs = dict(handle.attrs)
        if attrs.get(CACHE_MARK[0]) != CACHE_MARK[1]:
            if set(attrs) == _V2_ATTRS and set(handle) == _V2_DATASETS:
                return "made by an earlier version of peaknet-distill"
            raise FormatError(cache, refuse)
        try:
            old = json.loads(str(attrs.get("key", "{}")))
        except json.JSONDecodeError:
            old = {}
        reasons = _why_stale(old if isinstance(old, dict) else {}, key)
        if not reasons and ("logits" not in handle or len(handle["logits"]) != n_tiles):
            reasons.append("it is incomplete")
    return "; ".join(reasons) or None


def cache_path(config: dict[str, Any]) -> Path:
    """Where a run's teacher-logits cache is: ``cache``, or ``OUT/teacher_logits.h5``."""
    return Path(config.get("cache") or Path(config["out"]) / "teacher_logits.h5")


def cache_is_the_runs(cache: Path, out: Path) -> bool | None:
    """After a stop: whether ``cache`` holds the teacher logits of the run in ``out`` (True: a
    rerun reuses it and runs no teacher), or not yet (False: none there, or one of another
    teacher, label files or crop that a rerun rebuilds); None where it cannot be told (no
    readable :data:`RUN_KEY_NAME`: a stop before the run's checks wrote it, or a run of an
    earlier version).

    Why: the teacher pass is minutes of work, and a stopped run's one line says whether it is
    kept.  The cache is written whole or not at all (``atomic_path``), so a file marked as ours
    with the run's key is complete; the key kept in ``out`` is compared, not a new
    :func:`cache_key`, which would hash the teacher's weights (seconds) while a batch
    scheduler's grace period runs."""
    import h5py

    if not cache.is_file():
        return False
    try:
        run_key = json.loads((out / RUN_KEY_NAME).read_text())
        with h5py.File(cache, "r") as handle:
            attrs = dict(handle.attrs)
        made_for = json.loads(str(attrs.get("key", "{}")))
    except (OSError, ValueError):
        return None
    if not isinstance(run_key, dict) or not isinstance(made_for, dict) \
            or attrs.get(CACHE_MARK[0]) != CACHE_MARK[1]:
        return None
    try:  # a run resumed from an earlier layout keeps that version in its key
        return not _why_stale(made_for, {**run_key, "version": CACHE_VERSION})
    except (KeyError, TypeError, AttributeError):  # a key damaged by hand
        return None


def _refuse_label_file_as_cache(cache: Path, label_files: list[str]) -> None:
    """The cache is written over whatever is at its path: never one of the inputs."""
    for path in label_files:
        same = (Path(path).resolve() == cache.resolve()
                or (cache.exists() and Path(path).exists() and os.path.samefile(path, cache)))
        if same:
            raise FormatError(cache, "the teacher-logits cache is one of the label files "
                              "(data.paths); set 'cache' to another path")


def _label_shapes(source: Any) -> list[tuple[int, int]]:
    """(H, W) of every frame of a checked ``LabelFileSource``, from the datasets' shapes."""
    import h5py

    per_file = []
    for path in source.paths:
        with h5py.File(path, "r") as handle:
            h, w = handle["images"].shape[1:]
        per_file.append((int(h), int(w)))
    return [per_file[file_no] for file_no, _ in source.index]


def cache_key(teacher: str, label_files: list[str], crop: int | None) -> dict[str, Any]:
    """What the teacher's logits depend on: the teacher's identity, each label file's, the crop
    and the cache layout version (a cache, and a student trained on one, answer only this)."""
    return {"version": CACHE_VERSION, "crop": int(crop or 0), "teacher": teacher_identity(teacher),
            "labels": [label_identity(p) for p in label_files]}


#: Beside a distillation run's checkpoints: the :func:`cache_key` its student was trained on.
RUN_KEY_NAME = "teacher_key.json"


def check_same_teacher(out: Path, key: dict[str, Any]) -> None:
    """A resumed distillation must learn from the logits its checkpoints learnt from.  The run's
    settings name the teacher and label files by path (``trainer.check_start`` compares those,
    and the label files' identity); a teacher retrained at the same path would rebuild the
    cache and the student would go on against another teacher, one model of two teachers with a
    record naming one.  So a fresh run keeps its :func:`cache_key` in ``out`` and a resumed one is
    refused, naming what changed, where its key differs (a run from before the key was kept is
    resumed with a warning)."""
    from peaknet_xtal.atomic import write_json_atomic
    from peaknet_xtal.training.checkpoint import latest_checkpoint

    path = out / RUN_KEY_NAME
    if latest_checkpoint(out / "checkpoints") is None:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, key)
        return
    try:
        kept = json.loads(path.read_text())
    except FileNotFoundError:
        log.warning("%s: no %s (a run from before it was kept): resuming without checking that "
                    "the teacher and label files are those its checkpoints learnt from", out,
                    RUN_KEY_NAME)
        return
    except (OSError, ValueError) as exc:
        raise FormatError(path, f"cannot read the run's teacher key: {exc}") from exc
    kept = kept if isinstance(kept, dict) else {}
    # the cache's layout version is the cache's affair: the same logits in a newer layout
    reasons = _why_stale({**kept, "version": key["version"]}, key)
    if reasons:
        raise FormatError(out, "holds a student distilled from other teacher logits ("
                          + "; ".join(reasons) + "): resuming would train one model against two "
                          f"teachers; choose another --out, or delete {out} to start afresh")


def cache_teacher_logits(teacher: str, label_files: list[str], cache: Path,
                         threads: int = 2, crop: int | None = None,
                         progress: bool = True) -> Path:
    """Run ``teacher`` once over ``crop``-sized tiles of every frame of ``label_files`` (whole
    frames when ``crop`` is None); skip if ``cache`` already holds them.

    The cache is keyed by the teacher's identity (``teacher_identity``), each label file's
    (``label_identity``), the crop and the layout version: any change rebuilds it, with a log
    line saying why.  Frames may differ in shape (label files from several detectors): each is
    tiled on its own, and a frame smaller than the tile is padded with masked pixels, as
    training crops are.  The tile is ``crop`` square, or the largest frame where that is
    smaller.  Only a file marked ``CACHE_MARK`` (or an unmarked cache of version 2) is ever
    replaced; ``cache`` naming any other file, or a label file, is a FormatError.  A stop
    (Ctrl-C, SIGTERM) during the teacher pass keeps no cache; one after it waits until the
    cache is written (``stopping.stops_held``), and is raised then.  ``progress``: the
    progress line of the teacher pass.
    """
    import h5py
    import torch

    from peaknet_xtal.model import load_model
    from peaknet_xtal.training.data import LabelFileSource

    cache = Path(cache)
    _refuse_label_file_as_cache(cache, label_files)
    paths: list[str | os.PathLike[str]] = list(label_files)
    source = LabelFileSource(paths)
    key = cache_key(teacher, label_files, crop)
    shapes = _label_shapes(source)
    big_h, big_w = (max(s[i] for s in shapes) for i in (0, 1))
    th, tw = (big_h, big_w) if crop is None else (min(int(crop), big_h), min(int(crop), big_w))
    origins = [[(y, x) for y in tile_origins(h, th) for x in tile_origins(w, tw)]
               for h, w in shapes]
    n_tiles = sum(len(o) for o in origins)
    if cache.exists():
        why = _cache_state(cache, key, n_tiles)
        if why is None:
            return cache
        log.info("rebuilding the teacher-logits cache %s: %s", cache, why)
    torch.set_num_threads(threads)
    model = load_model(teacher)
    rng = np.random.default_rng(0)
    # once the teacher has seen every frame, a stop waits until the cache is closed and in
    # place (seconds): it kept none, and the rerun ran the teacher again (minutes to hours)
    with stops_held(now=False) as hold, atomic_path(cache) as tmp, h5py.File(tmp, "w") as out:
        out.attrs.update({CACHE_MARK[0]: CACHE_MARK[1], "version": CACHE_VERSION,
                          "teacher": str(teacher), "crop": int(crop or 0),
                          "key": json.dumps(key, sort_keys=True)})
        images = out.create_dataset("images", (n_tiles, th, tw), np.float32, chunks=(1, th, tw))
        masks = out.create_dataset("masks", (n_tiles, th, tw), bool, chunks=(1, th, tw))
        labels = out.create_dataset("labels", (n_tiles, th, tw), bool, chunks=(1, th, tw))
        logits = out.create_dataset("logits", (n_tiles, 2, th, tw), np.float16,
                                    chunks=(1, 2, th, tw))
        tiles = out.create_dataset("tiles", (n_tiles, 3), np.int64)  # frame, ss0, fs0
        k = 0
        # a label file's row is one panel of a frame (labelling.labels): counted as such, so
        # that a multi-panel detector's 9 frames are not announced as 144
        with Progress(len(source), "panels", desc="teacher logits",
                      enabled=progress) as bar, torch.no_grad():
            for i in range(len(source)):
                image, mask, label = source.frame(i, rng)
                h, w = image.shape
                pad = ((0, max(th - h, 0)), (0, max(tw - w, 0)))
                if pad != ((0, 0), (0, 0)):  # smaller than the tile: padding is masked
                    image, mask, label = (np.pad(a, pad) for a in (image, mask, label))
                for y0, x0 in origins[i]:
                    window = (slice(y0, y0 + th), slice(x0, x0 + tw))
                    tile, tmask = np.ascontiguousarray(image[window]), mask[window]
                    x = torch.from_numpy(tile)[None, None]
                    m = torch.from_numpy(np.ascontiguousarray(tmask))[None, None]
                    images[k], masks[k], labels[k] = tile, tmask, label[window]
                    logits[k] = model(x, m)[0].numpy().astype(np.float16)
                    tiles[k] = (i, y0, x0)
                    k += 1
                bar.update(1)
            hold()
    return cache


class DistillDataset:
    """Cached tiles with their teacher logits and ground truth, same flips/rotations on all.

    The tiles are the student's crops: a cache made for another crop size is refused, since its
    logits answer a different input.
    """

    def __init__(self, cache: Path, size: int, seed: int) -> None:
        self.cache, self.size, self.seed = Path(cache), size, seed
        import h5py

        try:
            with h5py.File(self.cache, "r") as handle:
                marked = handle.attrs.get(CACHE_MARK[0]) == CACHE_MARK[1]
                version = int(handle.attrs.get("version", 1))
                made_for = int(handle.attrs.get("crop", -1))
                self.n = len(handle["logits"]) if "logits" in handle else 0
        except OSError as exc:
            raise FormatError(self.cache, f"cannot read the teacher-logits cache: {exc}") from exc
        if not marked or version != CACHE_VERSION:
            raise FormatError(self.cache, "not a teacher-logits cache of this version: run "
                              "cache_teacher_logits (peaknet-distill does) to make one")
        if made_for != int(size):
            raise FormatError(self.cache, f"teacher logits were cached for crop {made_for}, the "
                              f"student trains on crop {size}: cache_teacher_logits with that crop "
                              "(peaknet-distill calls it) rebuilds it")
        self._handle: Any = None

    def __len__(self) -> int:
        return self.n

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handle": None}

    def __getitem__(self, sample_id: int) -> dict[str, Any]:
        import h5py
        import torch

        if self._handle is None:
            self._handle = h5py.File(self.cache, "r")
        rng = np.random.default_rng([self.seed, int(sample_id)])
        epoch, pos = divmod(int(sample_id), self.n)
        i = int(np.random.default_rng([self.seed, epoch]).permutation(self.n)[pos])
        image, mask = self._handle["images"][i], self._handle["masks"][i]
        label = self._handle["labels"][i]
        teacher = self._handle["logits"][i].astype(np.float32)
        k, flip = int(rng.integers(4)), bool(rng.integers(2))
        if image.shape[-2] != image.shape[-1]:
            # a tile of a frame narrower than the crop is not square: a quarter turn would
            # give it another shape than its batch-mates (a collation error), so half turns
            k -= k % 2

        def geo(a: np.ndarray) -> np.ndarray:
            a = np.rot90(a, k, axes=(-2, -1))
            return np.ascontiguousarray(a[..., ::-1] if flip else a)

        return {"image": torch.from_numpy(geo(image))[None],
                "mask": torch.from_numpy(geo(mask))[None],
                "label": torch.from_numpy(geo(label)).long(),
                "teacher": torch.from_numpy(geo(teacher))}


def distill_batch_loss(logits: Any, batch: dict[str, Any], temperature: float,
                       weights: tuple[float, float, float]) -> tuple[Any, Any]:
    from peaknet_xtal.training.losses import distillation_loss

    valid = batch["mask"][:, 0]
    return (distillation_loss(logits, batch["teacher"], valid, temperature, weights,
                              reduction="sum", target=batch.get("label")), valid.sum())


def distill(config: dict[str, Any]) -> Path:
    """Cache teacher logits (once), then train the student; returns the student model path.
    The settings are checked (``trainer.check_start``: the student, ``data.crop`` against it
    and the teacher, the run folder) before the teacher pass."""
    config = deep_merge(DISTILL_DEFAULTS, config)
    if not config.get("teacher"):
        raise ValueError("distillation needs 'teacher' (a model name, file or directory)")
    check_start(resolve_model_name(config))
    cache = cache_path(config)
    crop = int(config["data"]["crop"])
    check_teacher(config["teacher"], crop)
    check_same_teacher(Path(config["out"]), cache_key(config["teacher"],
                                                      list(config["data"]["paths"]), crop))
    cache_teacher_logits(config["teacher"], list(config["data"]["paths"]), cache,
                         int(config["threads"]), crop=crop, progress=bool(config["progress"]))
    loss = functools.partial(distill_batch_loss,
                             temperature=float(config["loss"]["temperature"]),
                             weights=tuple(config["loss"]["weights"]))
    dataset = DistillDataset(cache, crop, int(config["seed"]))
    return launch(config, dataset, loss)
