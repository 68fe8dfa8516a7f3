"""Loading models: what a model setting names that is not trained weights, and weights whose
family only a plugin provides, say so in one error."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from peaknet_test_support import TINY_FAMILY, halving_family, unchecked_weights

from peaknet_xtal.errors import FormatError
from peaknet_xtal.model import load_model
from peaknet_xtal.model.weights_io import MODEL_FORMS, check_model, model_digest
from peaknet_xtal.registry import PluginError


def _tiny_weights(folder: Path) -> Path:
    """Weights of the plugin family ``tinyfam`` (TINY_FAMILY's), written without the plugin."""
    from safetensors.torch import save_file

    folder.mkdir()
    config = {"family": "tinyfam", "name": "my-tiny", "width": 3}
    save_file({"net.0.weight": torch.zeros(3, 1, 3, 3)}, str(folder / "model.safetensors"),
              metadata={"config": json.dumps(config)})
    return folder


def test_weights_of_a_family_whose_plugin_failed_to_load_name_that_plugin(install_plugin,
                                                                          tmp_path):
    """Found by a plugin author: with the plugin broken, ``--model runs/tiny400`` said only
    "unknown model family 'tinycnn'; known: ['peaknet']"; the README promises that asking for
    what only a failed plugin provides names it again."""
    weights = _tiny_weights(tmp_path / "run")
    install_plugin("tiny", TINY_FAMILY + "    raise ImportError('needs libfoo>=2')\n")
    for load in (check_model, load_model):
        with pytest.raises(FormatError, match=(
                r"unknown model family 'tinyfam'; known: \['peaknet'\]; not loaded: plugin "
                r"'tiny' \(entry point tiny = tiny_peaknet of tiny-dist 0\.1\) failed to load "
                r"\(ImportError: needs libfoo>=2\)")):
            load(weights)


@pytest.mark.parametrize("name, what", [
    ("my-tiny", "is a model architecture (family 'tinyfam') without trained weights"),
    ("student-atto-b2", "is a model architecture (family 'peaknet') without trained weights"),
    ("tinyfam", "is a model family without trained weights"),
])
def test_an_architecture_name_is_said_to_have_no_weights(install_plugin, name, what,
                                                         monkeypatch, tmp_path):
    """``peaknet2cxi --model mytiny`` said "cannot read the model weights: No such file or
    directory" (model_digest, first to read the setting); a name the model list shows is an
    architecture, and the error says so and what the setting takes."""
    monkeypatch.chdir(tmp_path)
    install_plugin("tiny", TINY_FAMILY)
    for read in (check_model, load_model, model_digest):
        with pytest.raises(FormatError) as caught:
            read(name)
        assert str(caught.value) == (f"{name}: {what}: none are shipped for it (train one with "
                                     "peaknet-train, whose run folder then holds them); "
                                     f"{MODEL_FORMS}")
    with pytest.raises(FormatError, match="^no-such-model: model weights not found"):
        check_model("no-such-model")  # no such name either: not found, as before


def test_weights_of_a_plugin_model_breaking_the_contract_are_its_plugin_error(
        install_plugin, tmp_path):
    """Not "model config cannot build a model" blamed on the weights file: the plugin's fault,
    named as the zoo names it."""
    weights = _tiny_weights(tmp_path / "run")
    install_plugin("tiny", TINY_FAMILY.replace("return self.net(x)",
                                               "return self.net(x)[..., :-1, :]"))
    with pytest.raises(PluginError, match=r"model 'my-tiny': model\(image \(1, 1, 33, 35\), "
                                          r"mask\) returned \(1, 2, 32, 35\)"):
        load_model(weights)


def test_weights_of_a_plugin_model_that_downsamples_are_refused_before_any_work(
        install_plugin, tmp_path):
    """Found by a plugin author: weights of a plugin model whose output is smaller than its
    input passed this check, which every host makes before any work (the engine, so
    PeakFinder and peaknet2cxi; the DIALS plugin), and were refused only when the network was
    first built, after peaknet2cxi had opened its inputs and written to its output folder.  Now
    the check builds and probes a plugin's network (not its weights), naming the file, the file
    named by its folder too; torch's random numbers are left as they were."""
    install_plugin("halving", halving_family(2))
    weights = unchecked_weights("halving", "my-halving", tmp_path / "run")
    for spec in (weights, weights.parent):
        with pytest.raises(PluginError, match=(
                rf"^{re.escape(str(weights))}: model family 'halving' \(plugin 'halving' .*\), "
                r"model 'my-halving': model\(image \(1, 1, 33, 35\), mask\) returned "
                r"\(1, 2, 32, 34\); .* a network that downsamples sets pad_multiple")):
            check_model(spec)


def test_a_plugin_models_check_leaves_torchs_random_numbers_as_they_were(install_plugin,
                                                                          tmp_path):
    """Building the network draws its initial weights: a script seeded before ``PeakFinder``
    (whose engine checks the model) must draw what it drew before."""
    install_plugin("tiny", TINY_FAMILY)
    weights = unchecked_weights("tinyfam", "my-tiny", tmp_path / "run")
    torch.manual_seed(3)
    unchecked = torch.rand(4)
    torch.manual_seed(3)
    assert check_model(weights) == weights
    assert torch.equal(torch.rand(4), unchecked)
