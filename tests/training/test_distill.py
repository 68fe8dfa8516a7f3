"""Distillation: the teacher runs once into an HDF5 cache; the student learns its outputs."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml

from peaknet_xtal.cli.distill import main as distill_main
from peaknet_xtal.errors import FormatError
from peaknet_xtal.model import create_model, load_model, save_model
from peaknet_xtal.training.distill import DistillDataset, cache_teacher_logits, distill_batch_loss
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
