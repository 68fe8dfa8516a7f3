"""Distillation: the teacher runs once into an HDF5 cache; the student learns its outputs."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import torch
import yaml

from peaknet_xtal.cli.distill import main as distill_main
from peaknet_xtal.model import create_model, load_model, save_model
from peaknet_xtal.training.distill import DistillDataset, cache_teacher_logits

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


def test_distill_dataset_keeps_logits_aligned_with_the_image(tmp_path: Path,
                                                            label_file: Path) -> None:
    cache = cache_teacher_logits(str(_teacher(tmp_path)), [str(label_file)], tmp_path / "c.h5",
                                 threads=1)
    with h5py.File(cache, "a") as handle:  # make the "teacher" output the image itself
        handle["logits"][:, 1] = handle["images"][:].astype(np.float16)
    sample = DistillDataset(cache, 32, seed=3)[5]
    assert torch.allclose(sample["teacher"][1], sample["image"][0].half().float())


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
