"""Training loop: exact resume, two-process gloo data parallel, the CLI on real HDF5 label files."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from peaknet_test_support import TINY_FAMILY
from safetensors.torch import load_file

from peaknet_xtal.cli.train import main as train_main
from peaknet_xtal.errors import FormatError
from peaknet_xtal.model import create_model, load_model
from peaknet_xtal.training.data import Augment, CropDataset, LabelFileSource, StepSampler
from peaknet_xtal.training.supervised import train

torch.set_num_threads(1)


def _config(out: Path, label_file: Path, **extra: object) -> dict:
    config = {
        "out": str(out), "threads": 1,
        "model": {"name": "yocto", "overrides": {"neck_blocks": 1}},
        "data": {"source": "labels", "paths": [str(label_file)], "crop": 32},
        "optim": {"batch_size": 2, "accum": 2, "lr": 3e-3},
        "schedule": {"steps": 6, "warmup": 2},
        "checkpoint": {"every": 2},
        "log_every": 1,
    }
    config.update(extra)
    return config


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def test_resume_gives_identical_weights(tmp_path: Path, label_file: Path) -> None:
    straight = _weights(train(_config(tmp_path / "a", label_file)))
    train(_config(tmp_path / "b", label_file, stop_after=3))  # stops between checkpoints 2, 4
    assert (tmp_path / "b" / "checkpoints" / "latest").read_text().strip() == "step_000003"
    resumed = _weights(train(_config(tmp_path / "b", label_file)))
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    state = torch.load(tmp_path / "b" / "checkpoints" / "step_000006" / "state.pt",
                       weights_only=False)
    assert state["step"] == 6 and "optimizer" in state and "scheduler" in state


def test_a_stopped_run_leaves_its_checkpoint_and_no_final_model(
        tmp_path: Path, label_file: Path, capsys) -> None:
    """stop_after (--stop-after) time-boxes a run: a model trained on part of its schedule is
    not the model the settings describe, so nothing is written under the final name until the
    schedule ends; the run says where it stopped and how to continue."""
    out = tmp_path / "run"
    stopped = train(_config(out, label_file, stop_after=2))
    assert stopped == out / "checkpoints" / "step_000002" and stopped.is_dir()
    assert not (out / "model.safetensors").exists() and not (out / "model.json").exists()
    err = capsys.readouterr().err
    assert (f"stopped at step 2 of 6; no final model yet: checkpoint {stopped} is kept; rerun "
            "the same command without --stop-after") in err
    assert "2/6 steps" in err and "100.0%" not in err  # progress against the whole schedule
    final = train(_config(out, label_file))
    assert final == out / "model.safetensors"
    assert json.loads((out / "model.json").read_text())["extra"] == {"steps": 6}
    assert "stopped at step" not in capsys.readouterr().err


def test_two_process_gloo_matches_one_process_with_the_global_batch(
        tmp_path: Path, label_file: Path) -> None:
    """2 ranks x batch 2 over gloo == 1 process x batch 4, up to float summation order.

    Adam's first steps move every weight by about +-lr whatever the gradient size, so a wrong
    reduction shows up as differences of order lr (3e-3); summation order gives ~1e-5.
    """
    data = {"source": "labels", "paths": [str(label_file)], "crop": 64}
    single = _config(tmp_path / "one", label_file, optim={"batch_size": 4, "accum": 1},
                     schedule={"steps": 2, "warmup": 1}, data=data)
    double = _config(tmp_path / "two", label_file, optim={"batch_size": 2, "accum": 1},
                     schedule={"steps": 2, "warmup": 1}, data=data, dist={"world_size": 2})
    a = _weights(train(single))
    b = _weights(train(double))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 3e-4
    torch.manual_seed(0)
    init = create_model("yocto", neck_blocks=1).state_dict()
    assert min(float((a[k] - init[k]).abs().max()) for k in a if k.endswith("weight")) > 1e-3


def test_step_sampler_splits_the_global_batch_across_ranks() -> None:
    whole = list(StepSampler(1, 3, accum=2, world=1, rank=0, batch=4))
    parts = [list(StepSampler(1, 3, accum=2, world=2, rank=r, batch=2)) for r in range(2)]
    for micro in range(4):
        assert sorted(parts[0][2 * micro:2 * micro + 2] + parts[1][2 * micro:2 * micro + 2]) \
            == whole[4 * micro:4 * micro + 4]


def test_augment_moves_the_label_with_the_image_and_masks_artifacts() -> None:
    rng = np.random.default_rng(0)
    image = np.zeros((40, 40), np.float32)
    image[5:8, 30:33] = 1000.0
    label = image > 0
    mask = np.ones_like(label)
    aug = Augment(noise=0.0, offset_sigma=0.0, gain=(1.0, 1.0), dead_line_prob=1.0)
    for _ in range(10):
        out_img, out_mask, out_lab = aug(image, mask, label, rng)
        peak = out_lab & out_mask
        assert peak.sum() > 0
        assert np.all(out_img[peak] >= 999.0)
        assert not out_lab[~out_mask].any()
        assert (~out_mask).any()


def test_crop_dataset_is_a_pure_function_of_the_sample_id(label_file: Path) -> None:
    ds = CropDataset(LabelFileSource([label_file]), 32, seed=5)
    a, b = ds[17], ds[17]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["image"].shape == (1, 32, 32) and a["label"].shape == (32, 32)
    assert not torch.equal(ds[17]["image"], ds[18]["image"])


def test_label_file_errors_name_file_and_dataset(tmp_path: Path) -> None:
    path = tmp_path / "bad.h5"
    with h5py.File(path, "w") as handle:
        handle["images"] = np.zeros((2, 8, 8), np.float32)
        handle["masks"] = np.ones((2, 8, 8), bool)
    with pytest.raises(FormatError, match=r"bad\.h5.*dataset labels"):
        LabelFileSource([path])
    with h5py.File(path, "a") as handle:
        handle["labels"] = np.zeros((2, 8, 9), np.uint8)
    with pytest.raises(FormatError, match="shapes differ"):
        LabelFileSource([path])


def test_cli_trains_a_model_that_finds_blobs(tmp_path: Path, label_file: Path,
                                             make_blobs) -> None:
    """peaknet-train on a real HDF5 label file: loss falls and held-out blobs are found."""
    import yaml

    config = _config(tmp_path / "run", label_file, schedule={"steps": 150, "warmup": 5},
                     checkpoint={"every": 30}, log_every=5)
    config["optim"] = {"batch_size": 4, "accum": 1, "lr": 1e-2}
    config["model"] = {"name": "yocto"}
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    assert train_main([str(path)]) == 0
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").open()]
    assert history[-1]["loss"] < 0.7 * history[0]["loss"]
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["config"]["out"]
    model = load_model(tmp_path / "run")
    images, masks, labels = make_blobs(2, (64, 64), seed=99)
    with torch.no_grad():
        pred = model(torch.from_numpy(images)[:, None], torch.from_numpy(masks)[:, None])
    pred = pred.argmax(1).numpy().astype(bool)
    recall = (pred & labels).sum() / labels.sum()
    precision = (pred & labels).sum() / max(pred.sum(), 1)
    print("blob recall", recall, "precision", precision)
    assert recall > 0.5 and precision > 0.3, (recall, precision)


class _Interrupting:
    """A dataset that is Ctrl-C'd when the loop first asks for sample ``at``."""

    def __init__(self, inner: CropDataset, at: int) -> None:
        self.inner, self.at = inner, at

    def __getitem__(self, sample_id: int) -> dict:
        if sample_id >= self.at:
            raise KeyboardInterrupt
        return self.inner[sample_id]


def test_resume_cuts_the_history_back_to_the_checkpoint(tmp_path: Path, label_file: Path) -> None:
    """Interrupted in step 4, after logging step 3 but with its last checkpoint at step 2: the
    rerun trains steps 3-6 again, and step 3 was logged twice."""
    config = _config(tmp_path / "run", label_file)
    dataset = CropDataset(LabelFileSource([label_file]), 32, seed=0)
    with pytest.raises(KeyboardInterrupt):  # step s, micro-batch 0 starts at (s*2)*2: step 4
        train(config, _Interrupting(dataset, at=12))
    history = tmp_path / "run" / "history.jsonl"
    assert [json.loads(line)["step"] for line in history.open()] == [1, 2, 3]
    train(config)
    assert [json.loads(line)["step"] for line in history.open()] == [1, 2, 3, 4, 5, 6]


def test_a_resume_with_other_settings_is_refused_before_anything_is_loaded(
        tmp_path: Path, label_file: Path) -> None:
    """The Python API refuses as the command line does (tests/cli/test_train.py)."""
    train(_config(tmp_path / "run", label_file, stop_after=2))
    other = _config(tmp_path / "run", label_file)
    other["optim"] = {**other["optim"], "lr": 0.01}
    with pytest.raises(FormatError, match=r"holds another run \(step_000002\) made with other "
                                          r"settings: optim\.lr: 0\.003 in the run, 0\.01 now"):
        train(other)


@pytest.mark.parametrize("stored, says", [
    ("config", "resuming without comparing them"),
    ("labels", "resuming without checking that the files are those it learnt from")])
def test_a_checkpoint_from_before_its_run_was_stored_still_resumes(
        tmp_path: Path, label_file: Path, caplog, stored: str, says: str) -> None:
    """Checkpoints store their run's settings, and later also its label files' identity: one
    made before either is resumed with a warning saying what was not checked."""
    train(_config(tmp_path / "run", label_file, stop_after=2))
    state_path = tmp_path / "run" / "checkpoints" / "step_000002" / "state.pt"
    state = torch.load(state_path, weights_only=True)
    assert json.loads(state["labels"])[0]["path"] == str(label_file.resolve())
    del state[stored]
    torch.save(state, state_path)
    with caplog.at_level("WARNING"):
        train(_config(tmp_path / "run", label_file))
    assert says in caplog.text
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_000006"


def test_a_label_file_rewritten_in_place_refuses_the_resume(
        tmp_path: Path, label_file: Path) -> None:
    """Same path, same size, new pixels: the modification time tells the run that its data
    changed (the label identity peaknet-distill keys its cache by); the Python API refuses as
    the command line does (tests/cli/test_train.py)."""
    train(_config(tmp_path / "run", label_file, stop_after=2))
    size = label_file.stat().st_size
    with h5py.File(label_file, "a") as handle:
        handle["images"][0] = handle["images"][0] + 1000.0
    assert label_file.stat().st_size == size
    with pytest.raises(FormatError) as info:
        train(_config(tmp_path / "run", label_file))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path / 'run'}: holds a run (step_000002) trained on other "
                              f"data: label file {label_file.resolve()} changed (modified ")
    assert "size" not in message
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_000002"


def test_an_error_in_a_data_loader_worker_is_one_line(tmp_path: Path, label_file: Path) -> None:
    """torch re-raises a worker's error as a RuntimeError holding the worker's traceback."""
    from peaknet_xtal.errors import PeakNetError

    damaged = tmp_path / "damaged.h5"
    with h5py.File(label_file) as source, h5py.File(damaged, "w") as handle:
        for name in ("images", "masks", "labels"):
            data = source[name][()]
            handle.create_dataset(name, data=data, chunks=(1, *data.shape[1:]),
                                  compression="gzip")
        chunks = [handle["images"].id.get_chunk_info(i) for i in range(6)]
    raw = bytearray(damaged.read_bytes())
    for info in chunks:
        raw[info.byte_offset:info.byte_offset + info.size] = b"\x55" * info.size
    damaged.write_bytes(bytes(raw))
    config = _config(tmp_path / "run", label_file)
    config["data"] = {**config["data"], "paths": [str(damaged)], "workers": 1}
    with pytest.raises(PeakNetError) as info:
        train(config)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{damaged}, dataset images: frame ")


def _plugin_run(tmp_path: Path, label_file: Path, **model: object) -> Path:
    """A training config file (YAML) for the plugin model ``my-tiny`` (peaknet_test_support's
    TINY_FAMILY), one short step."""
    import yaml

    config = _config(tmp_path / "run", label_file, model={"name": "my-tiny", **model})
    config["schedule"] = {"steps": 1, "warmup": 0}
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("change, model, problem", [
    (('self.config = {"family": "tinyfam", "name": name, "width": width}', "pass"), {},
     "the model has no config"),
    (('def __init__(self, width=4, name="custom")', "def __init__(self, width=4)"),
     {"overrides": {"width": 2}}, "TinyNet() takes no 'name' argument"),
])
def test_a_plugin_model_breaking_the_contract_is_refused_before_any_work(
        install_plugin, tmp_path: Path, label_file: Path, capsys, change, model, problem) -> None:
    """Found by a plugin author: a model without ``config`` trained, then failed at its first
    checkpoint with an AttributeError traceback; a ``build`` without ``name`` was blamed on
    model.overrides.  The start check names model.name, the family and its plugin."""
    install_plugin("tiny", TINY_FAMILY.replace(*change))
    with pytest.raises(SystemExit) as stopped:
        train_main([str(_plugin_run(tmp_path, label_file, **model))])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert ("model.name: model family 'tinyfam' (plugin 'tiny' (entry point tiny = tiny_peaknet "
            f"of tiny-dist 0.1)), model 'my-tiny': {problem}") in err
    assert "model.overrides" not in err and not (tmp_path / "run").exists()


def test_train_checks_the_crop_against_the_model_before_any_data_are_read(
        install_plugin, tmp_path: Path) -> None:
    """``train(config)`` made its dataset (opening the label files) before the start check, and
    a crop the model does not take failed later still, in the first step's forward pass.  Now
    the start check, ``data.crop`` against the model included, comes first (the label file
    here does not exist: reading it would have said so)."""
    from peaknet_test_support import halving_family

    from peaknet_xtal.config import ConfigError

    install_plugin("halving", halving_family(2, pad_multiple=2))
    config = _config(tmp_path / "run", tmp_path / "no-labels.h5", model={"name": "my-halving"})
    config["data"]["crop"] = 31
    with pytest.raises(ConfigError, match=r"^<input>: data\.crop: 31 does not suit model "
                                          r"'my-halving': its input sides must be multiples "
                                          r"of 2 .*: use 30 or 32"):
        train(config)
    assert not (tmp_path / "run").exists()


def test_a_model_name_only_a_plugin_that_failed_to_load_had_names_that_plugin(
        install_plugin, tmp_path: Path, label_file: Path, capsys) -> None:
    """``model.name: mytiny`` with the plugin broken listed the built-in names alone; the
    README promises that asking for what only a failed plugin provides names it again."""
    install_plugin("tiny", TINY_FAMILY + "    raise ImportError('needs libfoo>=2')\n")
    with pytest.raises(SystemExit) as stopped:
        train_main([str(_plugin_run(tmp_path, label_file))])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "model.name: must be one of atto, " in err
    assert ("; not loaded: plugin 'tiny' (entry point tiny = tiny_peaknet of tiny-dist 0.1) "
            "failed to load (ImportError: needs libfoo>=2)") in err
