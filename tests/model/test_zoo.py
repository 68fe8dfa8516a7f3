"""The model zoo: a plugin's model family is checked against the hook contract where its models
are made, and a clash of model names names the parties."""
from __future__ import annotations

import re

import pytest
import torch
from peaknet_test_support import TINY_FAMILY, halving_family

from peaknet_xtal.model import zoo
from peaknet_xtal.registry import PluginError

#: How errors name the plugin ``install_plugin("tiny", ...)`` installs.
TINY_PLUGIN = "plugin 'tiny' (entry point tiny = tiny_peaknet of tiny-dist 0.1)"


@pytest.mark.parametrize("change, problem", [
    (('self.config = {"family": "tinyfam", "name": name, "width": width}', "pass"),
     "the model has no config; the model must carry config: a JSON-serialisable dict with the "
     "family's name under 'family'"),
    (('"family": "tinyfam", "name": name,', '"family": "tinyfam", "name": name, "f": len,'),
     "its config is not JSON-serialisable"),
    (('"family": "tinyfam"', '"family": "tiny"'), "its config's family is 'tiny'"),
    (('def __init__(self, width=4, name="custom")', "def __init__(self, width=4)"),
     "TinyNet() takes no 'name' argument; build(**config) must accept name="),
    (("return self.net(x)", "return self.net(x)[:, :1]"),
     "model(image (1, 1, 33, 35), mask) returned (1, 1, 33, 35)"),
    (("def forward(self, x, mask=None):", "def peak_logit(self, x, mask=None):\n"
      "            return self.net(x)\n\n        def forward(self, x, mask=None):"),
     "model.peak_logit(image (1, 1, 33, 35), mask) returned (1, 2, 33, 35)"),
])
def test_a_plugin_model_breaking_the_contract_is_refused_where_it_is_made(
        install_plugin, change, problem):
    """Found by a plugin author: a model without ``config`` trained until its first checkpoint,
    then failed there with an AttributeError traceback; a ``build`` without ``name`` failed
    with a TypeError blamed on the user's overrides.  Now create_model and build_from_config
    (so load_model and peaknet-train) refuse it at once, naming the family and the plugin."""
    install_plugin("tiny", TINY_FAMILY.replace(*change))
    for make in (lambda: zoo.create_model("my-tiny"),
                 lambda: zoo.build_from_config({"family": "tinyfam", "name": "my-tiny",
                                                "width": 3})):
        with pytest.raises(PluginError) as caught:
            make()
        message = str(caught.value)
        assert message.startswith(f"model family 'tinyfam' ({TINY_PLUGIN}), model 'my-tiny': ")
        assert problem in message and "(see the hookspec peaknet_model_families)" in message


@pytest.mark.parametrize("kernel, got", [(2, "(1, 2, 32, 34)"), (3, "(1, 2, 34, 36)")])
def test_a_model_whose_output_is_another_size_is_refused_unless_it_says_pad_multiple(
        install_plugin, kernel, got):
    """A network that halves and doubles the image gave the finding engine's panels of odd
    sides a torch shape traceback (output one pixel smaller) or was cropped without a word
    (one larger).  The probe's odd sides show it when the model is made; declared as
    ``pad_multiple = 2`` the model is probed on sides it handles, and made."""
    install_plugin("halving", halving_family(kernel))
    with pytest.raises(PluginError, match=(
            rf"model 'my-halving': model\(image \(1, 1, 33, 35\), mask\) returned "
            rf"{re.escape(got)}; .* a network that downsamples "
            r"sets pad_multiple")):
        zoo.create_model("my-halving")


def test_a_model_saying_pad_multiple_is_made_and_probed_on_its_multiples(install_plugin):
    install_plugin("halving", halving_family(2, pad_multiple=2))
    model = zoo.create_model("my-halving")
    assert model.pad_multiple == 2 and model.config == {"family": "halving",
                                                        "name": "my-halving"}
    assert zoo.probe_shape(2) == (34, 38) and zoo.probe_shape(32) == (96, 160)
    assert zoo.probe_shape(1) == (33, 35) and zoo.probe_shape(64) == (64, 192)


def test_only_a_plugins_family_is_checked_against_the_contract(install_plugin):
    """What ``weights_io.check_model`` builds and probes before any work: a plugin's family,
    not the built-in one (tested with the package), nor a family no plugin registered."""
    install_plugin("halving", halving_family(2))
    assert zoo.contract_checked("halving")
    assert not zoo.contract_checked("peaknet") and not zoo.contract_checked("no-such-family")


def test_a_crop_the_model_does_not_take_says_the_multiple_and_the_nearest_crops(
        install_plugin):
    """Found by a plugin author: ``data.crop: 33`` for a model of ``pad_multiple = 2`` failed in
    the first training step, after the data were loaded, as a torch shape error.  A crop that
    is not a multiple is refused where the model's output does not match it; one the model
    takes anyway (it pads inside forward, as PeakNet does) is not."""
    install_plugin("halving", halving_family(2, pad_multiple=4))  # takes any even side
    model = zoo.create_model("my-halving")
    assert zoo.crop_problem(model, 32) is None and zoo.crop_problem(model, 34) is None
    assert zoo.crop_problem(model, 33) == (
        "its input sides must be multiples of 4 (its pad_multiple; model(image (1, 1, 33, 33), "
        "mask) returned (1, 2, 32, 32)): use 32 or 36")
    assert zoo.crop_problem(model, 3) == (
        "its input sides must be multiples of 4 (its pad_multiple; model(image (1, 1, 3, 3), "
        "mask) returned (1, 2, 2, 2)): use 4")
    with torch.device("meta"):  # as peaknet-train's start check builds it
        peaknet = zoo.create_model("yocto")
    assert peaknet.pad_multiple == 32 and zoo.crop_problem(peaknet, 76) is None


def test_the_probe_leaves_the_model_and_the_random_numbers_as_they_were(install_plugin):
    """Made in training mode, with its batch-norm statistics untouched and no random number
    drawn: a training run seeded before create_model draws the numbers it drew before."""
    from peaknet_xtal.registry import model_families

    install_plugin("tiny", TINY_FAMILY.replace(
        "torch.nn.ReLU(), torch.nn.Conv2d(width, 2, 1))",
        "torch.nn.BatchNorm2d(width), torch.nn.ReLU(), torch.nn.Conv2d(width, 2, 1))"))
    torch.manual_seed(3)
    model_families()["tinyfam"].build(width=3, name="my-tiny")  # no probe
    unprobed = torch.rand(4)
    torch.manual_seed(3)
    made = zoo.create_model("my-tiny")
    assert torch.equal(torch.rand(4), unprobed)
    norm = made.net[1]
    assert made.training and int(norm.num_batches_tracked) == 0
    assert torch.equal(norm.running_mean, torch.zeros(3))


def test_the_built_in_family_is_not_probed(monkeypatch):
    """PeakNet is tested on its own: making one costs no forward pass."""
    monkeypatch.setattr(zoo, "_probe", lambda *_: pytest.fail("PeakNet was probed"))
    assert zoo.create_model("atto").config["family"] == "peaknet"


def test_a_clash_with_a_built_in_model_name_names_the_module_that_declared_it(monkeypatch):
    """A plugin module calling ``zoo.register_model("tiny", ...)`` at import got the clash
    blamed on the built-in plugin alone; now both declaring modules are named."""
    monkeypatch.setattr(zoo, "_FAMILIES", {"peaknet": zoo._FAMILIES["peaknet"]})
    monkeypatch.setattr(zoo, "_SIZES", {"tiny": {"family": "peaknet"}})

    def build_z(name=None):
        raise AssertionError("never built")

    build_z.__module__ = "someone_elses_plugin"
    zoo.register_family("zoofam", build_z)
    with pytest.raises(ValueError, match=(
            r"model 'tiny' is registered twice: for family 'peaknet' \(declared in "
            r"peaknet_xtal\.model\.peaknet\) and for family 'zoofam' \(declared in "
            r"someone_elses_plugin\)")):
        zoo.register_model("tiny", "zoofam")


def test_the_catalogue_lists_each_family_with_its_plugin_and_models(install_plugin):
    install_plugin("tiny", TINY_FAMILY)
    built_in, plugin = zoo.catalogue()
    assert built_in["family"] == "peaknet" and "atto" in built_in["models"]
    assert built_in["origin"] == "built-in peaknet_xtal.builtin.models"
    assert plugin == {"family": "tinyfam", "description": "two convolutions",
                      "origin": TINY_PLUGIN, "models": ["my-tiny"]}
