"""Distillation: the teacher runs once into an HDF5 cache; the student learns its outputs."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml

from peaknet_xtal.cli.distill import main as distill_main
from peaknet_xtal.errors import FormatError
from peaknet_xtal.model import create_model, load_model, save_model
from peaknet_xtal.training.distill import (
    CACHE_MARK,
    CACHE_VERSION,
    DistillDataset,
    cache_teacher_logits,
    distill,
    distill_batch_loss,
)
from peaknet_xtal.training.losses import distillation_loss, focal_loss

torch.set_num_threads(1)


def _teacher(tmp_path: Path) -> Path:
    torch.manual_seed(7)
    return save_model(create_model("yocto", neck_blocks=1), tmp_path / "teacher.safetensors")


def test_cache_holds_the_teacher_logits_and_is_computed_once(tmp_path: Path,
                                                             label_file: Path) -> None:
    teacher = _teacher(tmp_path)
    cache = cache_teacher_logits(str(teacher), [str(label_file)], tmp_path / "c.h5", threads=1)
    stamp = cache.stat().st_mtime_ns
    with h5py.File(cache) as handle, h5py.File(label_file) as labels:
        assert handle["logits"].shape == (6, 2, 72, 80)
        x = torch.from_numpy(labels["images"][2])[None, None]
        m = torch.from_numpy(labels["masks"][2].astype(bool))[None, None]
        with torch.no_grad():
            expected = load_model(teacher)(x, m)[0].numpy()
        np.testing.assert_allclose(handle["logits"][2], expected, rtol=1e-2, atol=2e-2)
    cache_teacher_logits(str(teacher), [str(label_file)], cache, threads=1)
    assert cache.stat().st_mtime_ns == stamp


def test_distill_dataset_keeps_logits_and_labels_aligned_with_the_image(
        tmp_path: Path, label_file: Path) -> None:
    cache = cache_teacher_logits(str(_teacher(tmp_path)), [str(label_file)], tmp_path / "c.h5",
                                 threads=1, crop=32)
    with h5py.File(cache, "a") as handle:  # make the "teacher" output the image itself
        handle["logits"][:, 1] = handle["images"][:].astype(np.float16)
        handle["labels"][:] = handle["images"][:] > 500
    dataset = DistillDataset(cache, 32, seed=3)
    for sample_id in range(5, 12):
        sample = dataset[sample_id]
        assert torch.allclose(sample["teacher"][1], sample["image"][0].half().float())
        assert torch.equal(sample["label"].bool(), sample["image"][0] > 500)


def test_teacher_sees_the_crops_the_student_sees(tmp_path: Path, label_file: Path) -> None:
    """Cached logits are the teacher's answer for each crop-sized tile, standardised as a tile
    (as the student's input is), not a crop of the whole-frame answer; tiles cover every pixel."""
    teacher_path = _teacher(tmp_path)
    cache = cache_teacher_logits(str(teacher_path), [str(label_file)], tmp_path / "c.h5",
                                 threads=1, crop=32)
    teacher = load_model(teacher_path)
    with h5py.File(cache) as handle, h5py.File(label_file) as labels:
        tiles = handle["tiles"][:]
        assert handle["logits"].shape == (6 * 3 * 3, 2, 32, 32)  # 72x80 -> 3x3 tiles of 32
        covered = np.zeros(labels["images"].shape, bool)
        for frame, y0, x0 in tiles:
            covered[frame, y0:y0 + 32, x0:x0 + 32] = True
        assert covered.all()
        frame, y0, x0 = tiles[4]
        window = (slice(y0, y0 + 32), slice(x0, x0 + 32))
        image = labels["images"][frame]
        mask = labels["masks"][frame].astype(bool)
        np.testing.assert_array_equal(handle["images"][4], image[window])
        np.testing.assert_array_equal(handle["labels"][4], labels["labels"][frame][window] > 0)
        with torch.no_grad():
            on_tile = teacher(torch.from_numpy(np.ascontiguousarray(image[window]))[None, None],
                              torch.from_numpy(np.ascontiguousarray(mask[window]))[None, None])
            whole = teacher(torch.from_numpy(image)[None, None],
                            torch.from_numpy(mask)[None, None])[..., window[0], window[1]]
        cached = torch.from_numpy(handle["logits"][4].astype(np.float32))
        assert torch.allclose(cached, on_tile[0], rtol=1e-2, atol=2e-2)
        assert not torch.allclose(cached, whole[0], rtol=1e-2, atol=2e-2)


def test_a_cache_for_another_crop_is_refused_and_rebuilt(tmp_path: Path,
                                                        label_file: Path) -> None:
    teacher = str(_teacher(tmp_path))
    cache = cache_teacher_logits(teacher, [str(label_file)], tmp_path / "c.h5", threads=1,
                                 crop=32)
    with pytest.raises(FormatError, match="crop 32.*crop 48"):
        DistillDataset(cache, 48, seed=0)
    cache_teacher_logits(teacher, [str(label_file)], cache, threads=1, crop=48)
    assert len(DistillDataset(cache, 48, seed=0)) == 6 * 2 * 2


@pytest.mark.parametrize("what", ["simulator truth", "text file"])
def test_a_cache_path_naming_another_file_is_refused_not_overwritten(
        tmp_path: Path, label_file: Path, sim_run, what: str) -> None:
    """Only a file marked as this project's teacher cache is ever replaced: anything else at the
    ``cache`` path (a simulator's truth file, any other file) is an error naming it, untouched."""
    if what == "simulator truth":
        cache = Path(shutil.copy(sim_run.truth, tmp_path / "sim_truth.h5"))
    else:
        cache = tmp_path / "notes.txt"
        cache.write_text("beam time notes\n")
    before = cache.read_bytes()
    with pytest.raises(FormatError, match="not a peaknet-distill teacher-logits cache") as info:
        cache_teacher_logits(str(_teacher(tmp_path)), [str(label_file)], cache, threads=1,
                             crop=32)
    assert info.value.path == str(cache)
    assert cache.read_bytes() == before


@pytest.mark.parametrize("spelling", ["same", "dotted", "hard link"])
def test_a_label_file_is_never_the_cache(tmp_path: Path, label_file: Path,
                                         spelling: str) -> None:
    cache = {"same": label_file, "dotted": tmp_path / "sub" / ".." / label_file.name,
             "hard link": tmp_path / "link.h5"}[spelling]
    if spelling == "hard link":
        os.link(label_file, cache)
    before = label_file.read_bytes()
    with pytest.raises(FormatError, match="cache is one of the label files"):
        cache_teacher_logits(str(_teacher(tmp_path)), [str(label_file)], cache, threads=1,
                             crop=32)
    assert label_file.read_bytes() == before


def test_a_cache_from_the_earlier_layout_is_rebuilt(tmp_path: Path, label_file: Path) -> None:
    """An unmarked version-2 cache (what peaknet-distill wrote before caches were marked) is
    still recognised as a cache: a rerun in an old run folder rebuilds it instead of failing."""
    cache = tmp_path / "c.h5"
    with h5py.File(cache, "w") as handle:
        handle.attrs.update({"teacher": "old", "version": 2, "crop": 32})
        for name in ("images", "masks", "labels", "logits", "tiles"):
            handle[name] = np.zeros((1, 1))
    cache_teacher_logits(str(_teacher(tmp_path)), [str(label_file)], cache, threads=1, crop=32)
    with h5py.File(cache) as handle:
        assert handle.attrs[CACHE_MARK[0]] == CACHE_MARK[1]
        assert handle.attrs["version"] == CACHE_VERSION
        assert len(handle["logits"]) == 6 * 3 * 3


def _tile_logits(teacher: Path | str, cache: Path, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The cached logits of tile ``k`` and the teacher's answer for that tile now."""
    with h5py.File(cache) as handle:
        image, mask = handle["images"][k], handle["masks"][k]
        cached = handle["logits"][k].astype(np.float32)
    with torch.no_grad():
        now = load_model(teacher)(torch.from_numpy(image)[None, None],
                                  torch.from_numpy(mask)[None, None])[0].numpy()
    return cached, now


def test_a_label_file_rewritten_in_place_rebuilds_the_cache(
        tmp_path: Path, label_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Same path, same size, new pixels: the modification time tells the cache is stale."""
    teacher = str(_teacher(tmp_path))
    cache = cache_teacher_logits(teacher, [str(label_file)], tmp_path / "c.h5", threads=1,
                                 crop=32)
    size = label_file.stat().st_size
    with h5py.File(label_file, "a") as handle:
        handle["images"][0] = handle["images"][0] + 1000.0
    assert label_file.stat().st_size == size
    with caplog.at_level(logging.INFO, logger="peaknet_xtal"):
        cache_teacher_logits(teacher, [str(label_file)], cache, threads=1, crop=32)
    assert f"label file {label_file.resolve()} changed" in caplog.text
    with h5py.File(cache) as handle, h5py.File(label_file) as labels:
        frame, y0, x0 = handle["tiles"][0]
        np.testing.assert_array_equal(handle["images"][0],
                                      labels["images"][frame][y0:y0 + 32, x0:x0 + 32])


def test_the_teacher_pass_counts_label_rows_as_panels(tmp_path: Path, label_file: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A label file's row is one panel of a frame: a 16-panel detector's 9 frames were
    announced as "teacher logits: 144 frames"."""
    cache_teacher_logits(str(_teacher(tmp_path)), [str(label_file)], tmp_path / "c.h5",
                         threads=1, crop=32)
    err = capsys.readouterr().err
    assert "teacher logits: 6/6 panels" in err and "frames" not in err


def test_a_teacher_retrained_at_the_same_path_rebuilds_the_cache_a_copy_does_not(
        tmp_path: Path, label_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    teacher = _teacher(tmp_path)
    cache = cache_teacher_logits(str(teacher), [str(label_file)], tmp_path / "c.h5", threads=1,
                                 crop=32)
    stamp = cache.stat().st_mtime_ns
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(teacher, copy)
    shutil.copy(teacher.with_suffix(".json"), copy)
    cache_teacher_logits(str(copy), [str(label_file)], cache, threads=1, crop=32)
    assert cache.stat().st_mtime_ns == stamp  # the same weights under another name
    torch.manual_seed(8)
    save_model(create_model("yocto", neck_blocks=1), teacher)  # retrained, same path
    with caplog.at_level(logging.INFO, logger="peaknet_xtal"):
        cache_teacher_logits(str(teacher), [str(label_file)], cache, threads=1, crop=32)
    assert "the teacher's weights changed" in caplog.text
    cached, now = _tile_logits(teacher, cache, 4)
    np.testing.assert_allclose(cached, now, rtol=1e-2, atol=2e-2)


def test_frames_of_different_shapes_are_tiled_each_on_its_own(
        tmp_path: Path, label_file: Path, make_blobs) -> None:
    """Label files from two detectors: every frame is covered by crop-sized tiles of its own;
    a frame narrower than the crop is padded with masked pixels (as training crops are)."""
    images, masks, labels = make_blobs(2, (40, 100), seed=4)
    other = tmp_path / "other_detector.h5"
    with h5py.File(other, "w") as handle:
        handle["images"], handle["masks"], handle["labels"] = images, masks, labels
    teacher = _teacher(tmp_path)
    cache = cache_teacher_logits(str(teacher), [str(label_file), str(other)],
                                 tmp_path / "c.h5", threads=1, crop=48)
    with h5py.File(cache) as handle:
        tiles = handle["tiles"][:]
        # 72x80 -> 2x2 tiles of 48; 40x100 -> 1x3, padded to 48 rows
        assert handle["logits"].shape == (6 * 4 + 2 * 3, 2, 48, 48)
        for frame in (0, 6, 7):
            h, w = (72, 80) if frame < 6 else (40, 100)
            covered = np.zeros((h, w), bool)
            for y0, x0 in tiles[tiles[:, 0] == frame][:, 1:]:
                covered[y0:y0 + 48, x0:x0 + 48] = True
            assert covered.all()
        k = int(np.flatnonzero(tiles[:, 0] == 7)[1])
        _, y0, x0 = tiles[k]
        np.testing.assert_array_equal(handle["images"][k][:40], images[1][:, x0:x0 + 48])
        np.testing.assert_array_equal(handle["masks"][k][:40], masks[1][:, x0:x0 + 48])
        assert not handle["masks"][k][40:].any() and not handle["labels"][k][40:].any()
    cached, now = _tile_logits(teacher, cache, k)
    np.testing.assert_allclose(cached, now, rtol=1e-2, atol=2e-2)
    assert len(DistillDataset(cache, 48, seed=0)) == 30


def test_focal_term_learns_the_ground_truth_not_the_teacher() -> None:
    torch.manual_seed(0)
    student = torch.randn(2, 2, 8, 8)
    teacher = torch.randn(2, 2, 8, 8)
    teacher[:, 0] += 10.0  # the teacher sees no peak anywhere
    truth = torch.zeros(2, 8, 8, dtype=torch.long)
    truth[:, 3:5, 3:5] = 1  # but there is one
    focal_only = (0.0, 0.0, 1.0)
    with_truth = distillation_loss(student, teacher, None, 2.0, focal_only, target=truth)
    assert torch.isclose(with_truth, focal_loss(student, truth))
    without = distillation_loss(student, teacher, None, 2.0, focal_only)
    assert torch.isclose(without, focal_loss(student, teacher.argmax(dim=1)))
    assert not torch.isclose(with_truth, without)
    batch = {"mask": torch.ones(2, 1, 8, 8, dtype=torch.bool), "teacher": teacher,
             "label": truth}
    total, count = distill_batch_loss(student, batch, 2.0, focal_only)
    assert torch.isclose(total / count, with_truth)


def test_distill_checks_the_crop_against_the_teacher_before_the_teacher_pass(
        install_plugin, tmp_path: Path, label_file: Path) -> None:
    """The teacher runs on crop-sized tiles as they are: a crop a plugin teacher does not take
    failed during its pass over every frame (minutes to hours on real data) as a torch shape
    error.  Now ``distill`` refuses it first, naming ``data.crop``, the teacher and the
    multiple, and leaves no cache; a PeakNet student takes the crop (it pads inside
    forward)."""
    from peaknet_test_support import halving_family, unchecked_weights

    from peaknet_xtal.config import ConfigError

    install_plugin("halving", halving_family(2, pad_multiple=2))
    teacher = unchecked_weights("halving", "my-halving", tmp_path / "teacher")
    config = {"out": str(tmp_path / "run"), "teacher": str(teacher), "threads": 1,
              "model": {"name": "yocto"}, "data": {"paths": [str(label_file)], "crop": 33}}
    with pytest.raises(ConfigError, match=(
            rf"^<input>: data\.crop: 33 does not suit the teacher {re.escape(str(teacher))}: "
            r"its input sides must be multiples of 2 .*: use 32 or 34$")):
        distill(config)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("size", ["atto", "femto", "pico", "nano", "tiny", "base", "large",
                                  "huge"])
def test_paper_presets_have_the_heads_upsampling_path(size: str) -> None:
    with torch.device("meta"):
        model = create_model(size)
    assert model.config["learned_upsample"]
    assert isinstance(model.head.learned_up, torch.nn.ConvTranspose2d)


def test_cli_student_moves_towards_the_teacher(tmp_path: Path, label_file: Path) -> None:
    teacher = _teacher(tmp_path)
    config = {"out": str(tmp_path / "run"), "teacher": str(teacher), "threads": 1,
              "model": {"name": "yocto", "overrides": {"neck_blocks": 1}},
              "data": {"paths": [str(label_file)], "crop": 32},
              "optim": {"batch_size": 2, "lr": 3e-3}, "schedule": {"steps": 30, "warmup": 3},
              "checkpoint": {"every": 15}, "log_every": 5, "seed": 1}
    path = tmp_path / "distill.yaml"
    path.write_text(yaml.safe_dump(config))
    assert distill_main([str(path)]) == 0
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").open()]
    assert history[-1]["loss"] < 0.85 * history[0]["loss"]
    assert (tmp_path / "run" / "teacher_logits.h5").exists()
    assert load_model(tmp_path / "run").config["name"] == "yocto"
