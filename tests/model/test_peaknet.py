"""PeakNet family: published parameter counts, shapes, input handling, mask, save/load."""
from __future__ import annotations

import json
import re

import pytest
import torch

from peaknet_xtal.errors import FormatError
from peaknet_xtal.model import create_model, list_models, load_model, save_model
from peaknet_xtal.model.peaknet import BACKBONES, PUBLISHED_BACKBONE_PARAMS

torch.set_num_threads(1)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", list_models())
def test_every_registered_size_builds_and_published_backbones_match(name: str) -> None:
    with torch.device("meta"):
        model = create_model(name)
    backbone = model.config["backbone"]
    assert backbone in BACKBONES
    if backbone in PUBLISHED_BACKBONE_PARAMS:
        ref = PUBLISHED_BACKBONE_PARAMS[backbone]
        assert abs(model.backbone_parameters() - ref) / ref < 0.01
    json.dumps(model.config)  # JSON-serialisable


def test_published_sizes_and_presets_are_registered() -> None:
    names = set(list_models())
    assert set(PUBLISHED_BACKBONE_PARAMS) <= names
    assert {"teacher", "student-tiny-b2", "student-tiny-b4", "student-atto-b2",
            "student-atto-b4", "default"} <= names


def test_teacher_has_the_papers_673m_parameters() -> None:
    with torch.device("meta"):
        teacher = create_model("teacher")
    assert teacher.config["neck_blocks"] == 4
    assert abs(_count(teacher) - 673.0e6) / 673.0e6 < 0.005


def test_overrides_change_the_architecture_and_feature_info_sizes_the_neck() -> None:
    model = create_model("yocto", dims=[8, 16, 24, 48], neck_width=16)
    info = model.backbone.feature_info
    assert [f["stride"] for f in info] == [4, 8, 16, 32]
    assert [a.in_channels for a in model.neck.adapters] == [8, 16, 24, 48]
    assert model.config["dims"] == [8, 16, 24, 48]


def test_neck_uses_real_spatial_depthwise_kernels() -> None:
    model = create_model("yocto")
    depthwise = [m for n, m in model.neck.named_modules() if n.endswith("depthwise")]
    assert depthwise and all(m.kernel_size == (3, 3) for m in depthwise)


@pytest.mark.parametrize("shape", [(37, 50), (64, 64), (185, 194)])
def test_any_input_size_gives_logits_of_the_same_size(shape: tuple[int, int]) -> None:
    model = create_model("yocto").eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, *shape) * 20 + 100)
    assert out.shape == (2, 2, *shape)
    assert torch.isfinite(out).all()


def test_masked_pixels_are_never_peaks_even_when_bright() -> None:
    torch.manual_seed(0)
    model = create_model("yocto").eval()
    with torch.no_grad():  # make the model call everything a peak
        model.head.classifier.bias.copy_(torch.tensor([-50.0, 50.0]))
    x = torch.rand(1, 1, 40, 40)
    x[..., 10:15, 10:15] = 1e6
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[..., 8:20, 8:20] = False
    with torch.no_grad():
        pred = model(x, mask).argmax(1)
    assert pred[0, 8:20, 8:20].sum() == 0
    assert pred[0, 30:, 30:].all()


def test_output_ignores_masked_values_and_padding() -> None:
    """Garbage under the mask (NaN, 1e9) must not change any unmasked prediction."""
    torch.manual_seed(1)
    model = create_model("yocto").eval()
    x = torch.randn(1, 1, 50, 45) * 5 + 10
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[..., :, 40:] = False
    y = x.clone()
    y[..., :, 40:] = 1e9
    y[..., 0, 44] = float("nan")
    with torch.no_grad():
        a, b = model(x, mask), model(y, mask)
    assert torch.allclose(a, b)


def test_standardisation_makes_output_invariant_to_gain_and_offset() -> None:
    """CSPAD (ADU, pedestal-subtracted) and photon-counting detectors look the same to the model."""
    torch.manual_seed(2)
    model = create_model("yocto").eval()
    x = torch.poisson(torch.full((1, 1, 64, 64), 3.0))
    x[..., 20:23, 30:33] += 200
    with torch.no_grad():
        a, b = model(x), model(x * 25.0 - 400.0)
    assert torch.allclose(a, b, atol=1e-3)


def test_rejects_wrong_input_rank() -> None:
    with pytest.raises(ValueError, match="B, 1, H, W"):
        create_model("yocto")(torch.zeros(1, 32, 32))


def test_save_load_round_trip_file_and_directory(tmp_path) -> None:
    torch.manual_seed(3)
    model = create_model("yocto", neck_blocks=1).eval()
    x = torch.randn(1, 1, 33, 47)
    path = save_model(model, tmp_path / "m.safetensors")
    assert json.loads((tmp_path / "m.json").read_text())["neck_blocks"] == 1
    save_model(model, tmp_path / "dir")
    with torch.no_grad():
        ref = model(x)
        for spec in (path, tmp_path / "dir"):
            loaded = load_model(spec)
            assert not loaded.training
            assert torch.equal(loaded(x), ref)
    (tmp_path / "m.json").unlink()  # config from the safetensors metadata alone
    assert load_model(path).config["neck_blocks"] == 1


def test_load_errors_name_the_file(tmp_path) -> None:
    with pytest.raises(FormatError, match="not found"):
        load_model(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    (tmp_path / "bad.json").write_text(json.dumps(create_model("yocto").config))
    with pytest.raises(FormatError, match="bad.safetensors"):
        load_model(bad)
    # weights of another size under a config: one line naming the first tensor that differs
    from safetensors.torch import load_file, save_file

    small = save_model(create_model("yocto"), tmp_path / "small.safetensors")
    wide = load_file(str(save_model(create_model("zepto"), tmp_path / "wide.safetensors")))
    save_file(wide, str(small), metadata={"config": json.dumps(create_model("yocto").config)})
    with pytest.raises(FormatError) as caught:
        load_model(small)
    message = str(caught.value)
    assert message.startswith(f"{small}: weights do not fit the config (")
    assert "\n" not in message and re.search(
        r"\((no \S+|\S+ is not in it|\S+ is \[[\d, ]+\], not \[[\d, ]+\]), "
        r"and \d+ more misfits\)$", message)


def test_weights_with_nan_are_an_error_naming_the_file_and_tensor(tmp_path) -> None:
    """A diverged training run writes NaN weights; such a model marks no pixel, so every frame
    would pass with 0 peaks: loading them is the error instead."""
    model = create_model("yocto")
    path = save_model(model, tmp_path / "diverged.safetensors")
    assert load_model(path) is not None  # finite: loads
    state = {k: v.clone() for k, v in model.state_dict().items()}
    name = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
    state[name][0] = float("nan")
    save_model(model, path, state=state)
    with pytest.raises(FormatError) as caught:
        load_model(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and name in message and "NaN" in message


def test_weights_stored_as_integers_are_an_error_naming_the_file_and_tensor(tmp_path) -> None:
    """Loading casts weights of another number type silently: integer weights (rounded) gave
    other peaks, exit 0.  Another floating-point width (half precision) loads."""
    model = create_model("yocto")
    path = tmp_path / "ints.safetensors"
    state = {k: v.clone() for k, v in model.state_dict().items()}
    name = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
    save_model(model, path, state=dict(state, **{name: state[name].to(torch.int64)}))
    with pytest.raises(FormatError) as caught:
        load_model(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: weights of another number type ({name} is torch.int64")
    save_model(model, path, state=dict(state, **{name: state[name].half()}))
    assert load_model(path) is not None


def test_default_model_loads_in_eval_mode() -> None:
    model = load_model("default")
    assert not model.training and model.config["name"] == "default"
    with torch.no_grad():
        assert model(torch.zeros(1, 1, 40, 40)).shape == (1, 2, 40, 40)


def test_missing_default_weights_are_an_error_not_a_random_model(tmp_path, monkeypatch) -> None:
    from peaknet_xtal.model import weights_io

    monkeypatch.setattr(weights_io, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(FormatError, match="default.safetensors.*missing"):
        load_model("default")
