"""Every registered source and writer honours the hookspecs contracts; plugins register like
built-ins (in process, and through a real ``peaknet_xtal`` entry point)."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
from peaknet_test_support import TINY_FAMILY

from peaknet_xtal import registry
from peaknet_xtal.builtin.sources import SourceType
from peaknet_xtal.errors import FormatError
from peaknet_xtal.formats.geometry import parse_geometry
from peaknet_xtal.hookspecs import hookimpl
from peaknet_xtal.types import Frame, FrameResult, peaks_from_columns

SOURCES = sorted(registry.source_types())
#: Sources with a sample input below (third-party ones get the contract test only).
SAMPLED = [name for name in SOURCES if name in ("cxi", "dxtbx", "sim")]
WRITERS = sorted(registry.writer_types())


@pytest.fixture()
def geom_text(make_geometry_text) -> str:
    """Two 48x24 panels stacked in one 48x48 CXI slab."""
    return make_geometry_text(["a", "b"], 48, 24, [(-24, 1), (-24, -25)])


@pytest.fixture()
def samples(tmp_path: Path, real_data: Path, geom_text: str) -> dict[str, tuple[str, dict]]:
    """One readable input per built-in source, with the options it needs."""
    geom = tmp_path / "two.geom"
    geom.write_text(geom_text)
    cxi = tmp_path / "stack.cxi"
    with h5py.File(cxi, "w") as h5:
        h5["/entry_1/data_1/data"] = np.arange(3 * 48 * 48, dtype=np.float32).reshape(3, 48, 48)
    return {
        "cxi": (str(cxi), {"geometry": str(geom)}),
        "dxtbx": (str(real_data / "synchrotron_single_images" / "DLS_I23_P12M_thau_00001.cbf.gz"),
                  {}),
        "sim": (f"sim:{geom}", {"count": 2, "seed": 5}),
    }


def test_builtins_are_registered():
    assert {"cxi", "dxtbx", "sim"} <= set(SOURCES)
    assert {"cxi", "stream"} <= set(WRITERS)


@pytest.mark.parametrize("name", SOURCES)
def test_source_type_contract(name, tmp_path):
    kind = registry.source_types()[name]
    assert kind.name == name and isinstance(kind.description, str) and kind.description
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    broken = tmp_path / "broken.cxi"
    broken.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 20)
    for junk in (str(text), str(broken), str(tmp_path), str(tmp_path / "missing.h5"), ""):
        assert kind.sniff(junk) in (True, False)  # cheap and never raises
    assert not kind.sniff(str(text))


@pytest.mark.parametrize("name", SAMPLED)
def test_sources_open_their_samples_with_stable_keys(name, samples, request):
    if name == "dxtbx":
        request.getfixturevalue("dials_env")  # DIALS must be present in CI; skips only outside it
    path, options = samples[name]
    kind = registry.source_types()[name]
    assert kind.sniff(path)
    # the registry's own sniffing picks the same type for this file
    assert registry.open_source(path, **options).name == name
    source = kind.open(path, **options, an_unknown_option=1)
    first = [f.key for f in source]
    again = [f.key for f in source]
    source.close()
    assert first == again and len(set(first)) == len(first) == len(source)
    frame = next(iter(source))
    assert isinstance(frame, Frame) and frame.panels and frame.panels[0].dtype == np.float32


@pytest.mark.parametrize("name", SAMPLED)
def test_frame_at_reads_the_frame_of_an_event(name, samples, request):
    """Random access by key (the data engine's way in): the source's own ``frame_at`` where it
    has one (cxi, dxtbx), else reading in order (sim); an event the source lacks is an error."""
    if name == "dxtbx":
        request.getfixturevalue("dials_env")
    path, options = samples[name]
    source = registry.open_source(path, name, **options)
    try:
        frames = list(source)
        for frame in reversed(frames):
            again = registry.frame_at(source, frame.event)
            assert again.key == frame.key
            assert all(np.array_equal(a, b) for a, b in zip(again.panels, frame.panels,
                                                            strict=True))
        with pytest.raises(FormatError):
            registry.frame_at(source, "//999999")
    finally:
        source.close()


def _results(geometry, n: int = 3) -> list[FrameResult]:
    out = []
    for i in range(n):
        panels = [np.full((24, 48), i, np.float32), np.zeros((24, 48), np.float32)]
        frame = Frame(panels=panels, source="/data/run1.cxi", event=f"//{i}", serial=i,
                      geometry=geometry)
        peaks = peaks_from_columns(panel=[0, 1], fs=[3.0 + i, 10.0], ss=[4.0, 20.5],
                                   intensity=[100.0, 50.0], one_over_d=[0.1, 0.2])
        out.append(FrameResult(frame=frame, peaks=peaks, hit=True))
    return out


@pytest.mark.parametrize("name", WRITERS)
def test_writer_contract_and_resume(name, tmp_path, geom_text):
    kind = registry.writer_types()[name]
    assert kind.name == name and kind.description and kind.suffix.startswith(".")
    geometry = parse_geometry(geom_text)
    target = str(tmp_path / f"out{kind.suffix}")
    results = _results(geometry)
    writer = kind.open(target, geometry=geometry, frames_per_file=2, an_unknown_option=1)
    assert writer.done_keys() == set()
    for r in results[:2]:
        writer.write(r)
    writer.close()
    resumed = kind.open(target, geometry=geometry, frames_per_file=2)
    assert resumed.done_keys() == {r.frame.key for r in results[:2]}
    resumed.write(results[2])
    resumed.close()
    assert kind.open(target, geometry=geometry).done_keys() == {r.frame.key for r in results}
    assert not list(tmp_path.rglob("*.part"))


def test_written_outputs_read_back(tmp_path, geom_text):
    """The two built-in writers agree on where the peaks are (raw slab, edges converted)."""
    from peaknet_xtal.formats.cxi import read_cxi_peaks
    from peaknet_xtal.formats.stream import read_stream

    geometry = parse_geometry(geom_text)
    results = _results(geometry, 2)
    for name, path in (("cxi", tmp_path / "p.cxi"), ("stream", tmp_path / "p.stream")):
        writer = registry.open_writer(name, str(path), geometry=geometry, mode="copy")
        for r in results:
            writer.write(r)
        writer.close()
    table = read_cxi_peaks(tmp_path / "p-00000.cxi")
    chunks = read_stream(tmp_path / "p.stream").chunks
    for row, chunk in enumerate(chunks):
        raw = table.raw(row)
        np.testing.assert_allclose(raw["peakXPosRaw"] + 0.5, chunk.peaks["fs"], atol=0.01)
        np.testing.assert_allclose(raw["peakYPosRaw"] + 0.5, chunk.peaks["ss"], atol=0.01)
        assert chunk.peaks["ss"][1] == pytest.approx(20.5 + 24 + 0.5)


class _ToyPlugin:
    """A third-party plugin, registered at run time."""

    @hookimpl
    def peaknet_source_types(self):
        return [SourceType("toy", "toy frames", lambda p: p.startswith("toy:"),
                           lambda p, **_: [Frame(panels=[np.zeros((2, 2), np.float32)])])]


def test_plugin_registered_in_process_shows_up():
    pm = registry.plugin_manager()
    plugin = _ToyPlugin()
    pm.register(plugin, name="toy-test")
    try:
        assert "toy" in registry.source_types()
        assert registry.open_source("toy:x")[0].panels[0].shape == (2, 2)
    finally:
        pm.unregister(plugin)
    assert "toy" not in registry.source_types()


def test_entry_point_plugin_is_found(tmp_path):
    """A plugin installed as a distribution with a ``peaknet_xtal`` entry point is loaded."""
    (tmp_path / "toy_peaknet.py").write_text(textwrap.dedent("""
        from peaknet_xtal.hookspecs import hookimpl
        from peaknet_xtal.builtin.writers import WriterType

        @hookimpl
        def peaknet_writer_types():
            return [WriterType("toyw", "toy writer", ".toy", lambda path, **_: None)]
    """))
    info = tmp_path / "toy_peaknet-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-peaknet\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[peaknet_xtal]\ntoy = toy_peaknet\n")
    code = "from peaknet_xtal import registry; print(sorted(registry.writer_types()))"
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "'toyw'" in out.stdout and "'cxi'" in out.stdout
    off = subprocess.run([sys.executable, "-c", code], env={**env, "PEAKNET_NO_PLUGINS": "1"},
                         capture_output=True, text=True, timeout=120)
    assert "'toyw'" not in off.stdout and "'stream'" in off.stdout


def test_every_hookspec_is_called_by_the_package():
    """A hook nobody calls is a promise to plugin authors that is never kept.  The registry
    calls each plugin's implementation itself (to name the plugin behind a fault), so what is
    checked is that some lookup asks the registry for the hook by name."""
    import inspect

    from peaknet_xtal import hookspecs

    root = Path(hookspecs.__file__).parent
    code = "\n".join(p.read_text() for p in root.rglob("*.py") if p.name != "hookspecs.py")
    specs = [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
             if name.startswith("peaknet_")]
    assert {"peaknet_source_types", "peaknet_writer_types", "peaknet_model_families"} <= set(specs)
    for name in specs:
        assert f'registered("{name}")' in code, f"hookspec {name} is never called"


# ---- third-party plugins installed through a real entry point, in this process ----------------
# (the install_plugin fixture: tests/conftest.py)

_NPY_SOURCE = """
    from peaknet_xtal.builtin.sources import SourceType
    from peaknet_xtal.hookspecs import hookimpl

    @hookimpl
    def peaknet_source_types():
        return [SourceType("npy", "numpy stacks", lambda p: str(p).endswith(".npy"),
                           lambda p, **_: "opened by npy")]
"""


def test_a_plugin_that_fails_to_import_is_skipped_with_one_warning(install_plugin, caplog):
    """A broken third-party plugin must not take down work that needs only the built-ins; what
    only it would have provided is an error naming it again."""
    install_plugin("broken", textwrap.dedent(_NPY_SOURCE) + "import a_module_not_installed\n")
    with caplog.at_level("WARNING", logger="peaknet_xtal.registry"):
        writers = registry.writer_types()
        registry.source_types()
    assert {"cxi", "stream"} <= set(writers) and "npy" not in registry.source_types()
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "plugin 'broken' (entry point broken = broken_peaknet of broken-dist 0.1)" in warning
    assert "ModuleNotFoundError" in warning and "PEAKNET_NO_PLUGINS=1" in warning
    with pytest.raises(ValueError, match=r"no registered source can read this file .*not "
                                         r"loaded: plugin 'broken' .*failed to load"):
        registry.open_source("frames.npy")
    with pytest.raises(KeyError, match="no source type 'npy'.*plugin 'broken'"):
        registry.open_source("frames.npy", "npy")


@pytest.mark.parametrize("returned, expect", [
    ('"npy"', "peaknet_source_types must return a list of source types (objects with name: "
              "str, description: str, sniff(path), open(path, **options)), not str 'npy'"),
    ("[object()]", "item 0 (<object object at"),
])
def test_a_hook_returning_the_wrong_type_names_the_plugin(install_plugin, returned, expect):
    install_plugin("badret", f"""
        from peaknet_xtal.hookspecs import hookimpl

        @hookimpl
        def peaknet_source_types():
            return {returned}
    """)
    with pytest.raises(registry.PluginError) as caught:
        registry.open_source("frames.npy")
    assert str(caught.value).startswith("plugin 'badret' (entry point badret = badret_peaknet "
                                        "of badret-dist 0.1): ")
    assert expect in str(caught.value)


def test_a_name_clash_names_both_plugins(install_plugin):
    install_plugin("clash", """
        from peaknet_xtal.builtin.writers import WriterType
        from peaknet_xtal.hookspecs import hookimpl

        @hookimpl
        def peaknet_writer_types():
            return [WriterType("cxi", "CSV pretending", ".csv", lambda path, **_: None)]
    """)
    with pytest.raises(registry.PluginError, match=(
            r"two writer types are registered as 'cxi': by built-in "
            r"peaknet_xtal\.builtin\.writers and by plugin 'clash' \(entry point clash = "
            r"clash_peaknet of clash-dist 0\.1\)")):
        registry.writer_types()


def test_a_raising_sniff_is_not_mine_with_one_warning(install_plugin, tmp_path, caplog):
    install_plugin("sniffy", """
        from peaknet_xtal.builtin.sources import SourceType
        from peaknet_xtal.hookspecs import hookimpl

        def sniff(path):
            raise RuntimeError("boom in sniff")

        @hookimpl
        def peaknet_source_types():
            return [SourceType("sniffy", "raises", sniff, lambda p, **_: None)]
    """)
    stack = tmp_path / "stack.h5"
    with h5py.File(stack, "w") as h5:
        h5["/data/data"] = np.zeros((2, 4, 4), np.float32)
    with caplog.at_level("WARNING", logger="peaknet_xtal.registry"):
        for _ in range(2):
            with pytest.raises(ValueError, match="no registered source can read this file"):
                registry.open_source(str(tmp_path / "notes.txt"))
        source = registry.open_source(str(stack))
    assert source.name == "cxi"
    (warning,) = [r.getMessage() for r in caplog.records]
    assert warning.startswith("plugin 'sniffy' (entry point sniffy = sniffy_peaknet")
    assert "RuntimeError: boom in sniff" in warning


def test_built_ins_are_asked_before_plugins(install_plugin, tmp_path):
    """As the registry says: a plugin claims what no built-in reads, and cannot take over a file
    a built-in reads (pluggy itself calls the plugin registered last first)."""
    install_plugin("greedy", """
        from peaknet_xtal.builtin.sources import SourceType
        from peaknet_xtal.hookspecs import hookimpl

        @hookimpl
        def peaknet_source_types():
            return [SourceType("greedy", "claims everything", lambda p: True,
                               lambda p, **_: "greedy")]
    """)
    names = list(registry.source_types())
    assert names[:3] == ["cxi", "dxtbx", "sim"] and "greedy" in names[3:]
    stack = tmp_path / "stack.h5"
    with h5py.File(stack, "w") as h5:
        h5["/data/data"] = np.zeros((2, 4, 4), np.float32)
    assert registry.open_source(str(stack)).name == "cxi"
    assert registry.open_source(str(tmp_path / "notes.txt")) == "greedy"


def test_a_misspelt_hook_or_a_plugin_without_hooks_is_warned_about(install_plugin, caplog):
    """pluggy registers a hook no spec names (``peaknet_source_type``, the s missing) and a
    module without any hook, silently: the plugin's sources never appeared and nothing said
    why.  One warning each names the plugin and the unknown hook; the valid hooks still work."""
    install_plugin("typo", """
        from peaknet_xtal.builtin.sources import SourceType
        from peaknet_xtal.builtin.writers import WriterType
        from peaknet_xtal.hookspecs import hookimpl

        @hookimpl
        def peaknet_source_type():
            return [SourceType("neverseen", "misspelt", lambda p: True, lambda p, **_: None)]

        @hookimpl
        def peaknet_writer_types():
            return [WriterType("typow", "still works", ".t", lambda path, **_: None)]
    """)
    install_plugin("hookless", """
        def peaknet_source_types():  # no @hookimpl
            return []
    """)
    with caplog.at_level("WARNING", logger="peaknet_xtal.registry"):
        writers = registry.writer_types()
    assert "typow" in writers and "neverseen" not in registry.source_types()
    messages = [r.getMessage() for r in caplog.records]
    typo = next(m for m in messages if m.startswith("plugin 'typo'"))
    hookless = next(m for m in messages if m.startswith("plugin 'hookless'"))
    assert typo.startswith("plugin 'typo' (entry point typo = typo_peaknet of typo-dist 0.1): "
                           "unknown hook(s) peaknet_source_type (did you mean "
                           "peaknet_source_types?)"), typo
    assert hookless.startswith("plugin 'hookless' (entry point hookless = hookless_peaknet of "
                               "hookless-dist 0.1) implements no hook"), hookless
    assert "peaknet_source_types lack(s) the @peaknet_xtal.hookspecs.hookimpl" in hookless
    assert len(messages) == 2


_ARRAYS_SOURCE = """
    import numpy as np
    from peaknet_xtal.builtin.sources import SourceType
    from peaknet_xtal.hookspecs import hookimpl

    class Arrays:
        name = "arrays"

        def __init__(self, path):
            self.path = path

        def __iter__(self):
            yield np.zeros((8, 8), np.float32)

        def frame_at(self, event):
            return np.zeros((8, 8), np.float32)

        def close(self):
            pass

    @hookimpl
    def peaknet_source_types():
        return [SourceType("arrays", "yields arrays", lambda p: str(p).endswith(".arr"),
                           lambda p, **_: Arrays(p)),
                SourceType("nothing", "opens as None", lambda p: str(p).endswith(".none"),
                           lambda p, **_: None)]
"""


def test_a_source_giving_no_frames_is_an_error_naming_its_plugin(install_plugin):
    """A source yielding bare arrays failed at the first attribute read ('numpy.ndarray' object
    has no attribute 'event'), an ``open`` returning None at ``close()``, naming no plugin."""
    install_plugin("arrays", _ARRAYS_SOURCE)
    source = registry.open_source("x.arr")
    who = "plugin 'arrays' (entry point arrays = arrays_peaknet of arrays-dist 0.1): "
    with pytest.raises(registry.PluginError) as caught:
        list(registry.checked_frames(source, "x.arr"))
    assert str(caught.value).startswith(
        f"{who}source type 'arrays' yielded a numpy.ndarray of shape (8, 8) float32 for x.arr, "
        "not a peaknet_xtal.types.Frame")
    with pytest.raises(registry.PluginError, match="source type 'arrays' yielded a numpy"):
        registry.frame_at(source, "//0")
    with pytest.raises(registry.PluginError) as caught:
        registry.checked_source(registry.open_source("x.none"), "nothing", "x.none")
    assert str(caught.value).startswith(f"{who}source type 'nothing' opened x.none as NoneType "
                                        "None, not a FrameSource")


def test_a_malformed_options_declaration_names_the_plugin(install_plugin):
    install_plugin("opts", """
        from peaknet_xtal.builtin.sources import SourceType
        from peaknet_xtal.hookspecs import hookimpl

        @hookimpl
        def peaknet_source_types():
            return [SourceType("opts", "options as one string", lambda p: False,
                               lambda p, **_: None, options="detector")]
    """)
    with pytest.raises(registry.PluginError, match=r"plugin 'opts' .*source type 'opts': "
                                                   "options must be a sequence of option names"):
        registry.source_options()


def test_a_plugin_model_family_is_created_by_name_and_trained_by_peaknet_train(
        install_plugin, tmp_path, capsys):
    """An architecture from a plugin is a model like the built-in ones: listed, created by
    name, rebuilt from its saved config, and accepted and trained by peaknet-train."""
    import torch
    import yaml

    from peaknet_xtal.cli.train import main as train_main
    from peaknet_xtal.model import load_model, zoo

    install_plugin("tiny", TINY_FAMILY)
    assert zoo.list_models()[0] == "atto" and zoo.list_models()[-1] == "my-tiny"
    assert zoo.list_models("tinyfam") == ["my-tiny"]
    assert zoo.known_families() == ["peaknet", "tinyfam"]
    model = zoo.create_model("my-tiny")
    assert type(model).__name__ == "TinyNet" and model.config["width"] == 3
    assert zoo.build_from_config(model.config).config == model.config
    assert zoo.create_model("yocto").config["family"] == "peaknet"  # the built-ins are still there

    labels = tmp_path / "labels.h5"
    rng = np.random.default_rng(0)
    with h5py.File(labels, "w") as handle:
        handle["images"] = rng.poisson(20.0, (2, 32, 32)).astype(np.float32)
        handle["masks"] = np.ones((2, 32, 32), np.uint8)
        handle["labels"] = (rng.random((2, 32, 32)) < 0.02).astype(np.uint8)
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({
        "out": str(tmp_path / "run"), "threads": 1, "model": {"name": "my-tiny"},
        "data": {"source": "labels", "paths": [str(labels)], "crop": 16},
        "optim": {"batch_size": 2}, "schedule": {"steps": 1, "warmup": 0},
        "checkpoint": {"every": 1}}))
    torch.set_num_threads(1)
    assert train_main([str(config)]) == 0
    final = capsys.readouterr().out.splitlines()[0].rsplit(" -> ", 1)[1]  # the summary's
    assert final.endswith("model.safetensors")
    assert load_model(final).config == {"family": "tinyfam", "name": "my-tiny", "width": 3}


def test_a_plugin_model_that_breaks_the_contract_is_one_error_before_any_work(
        install_plugin, tmp_path, capsys):
    """model(image, mask) is what training calls: a plugin model taking the image alone is
    refused by peaknet-train's checks, naming the model and its plugin, not a traceback from
    inside the first step."""
    import yaml

    from peaknet_xtal.cli.train import main as train_main

    install_plugin("oneinput", TINY_FAMILY.replace("def forward(self, x, mask=None)",
                                                    "def forward(self, x)"))
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"out": str(tmp_path / "run"),
                                      "model": {"name": "my-tiny"}}))
    with pytest.raises(SystemExit) as stopped:
        train_main([str(config)])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert ("model.name: model family 'tinyfam' (plugin 'oneinput' (entry point oneinput = "
            "oneinput_peaknet of oneinput-dist 0.1)), model 'my-tiny': model(image (1, 1, 33, "
            "35), mask) raised TypeError") in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()
