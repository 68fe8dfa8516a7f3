"""peaknet-show on inputs only a plugin's frame source reads: opened through the registry, as
peaknet2cxi opens them."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from peaknet_xtal import registry
from peaknet_xtal.builtin.sources import SourceType
from peaknet_xtal.cli.show import main
from peaknet_xtal.hookspecs import hookimpl
from peaknet_xtal.types import Frame


class _NpySource:
    """A plugin's source of ``.npy`` stacks (N, ss, fs), one panel, NaN pixels masked."""

    name = "npy"

    def __init__(self, path: str, **_: object) -> None:
        self.path = path
        self.data = np.load(path)

    def __len__(self) -> int:
        return len(self.data)

    def __iter__(self) -> Iterator[Frame]:
        for i, image in enumerate(self.data):
            panel = np.nan_to_num(image.astype(np.float32), nan=-1e6)
            yield Frame(panels=[panel], masks=[np.isfinite(image)], source=self.path,
                        event=f"//{i}", serial=i)

    def close(self) -> None:
        pass


class _NpyPlugin:
    @hookimpl
    def peaknet_source_types(self) -> list[SourceType]:
        return [SourceType("npy", "numpy .npy stacks", lambda p: str(p).endswith(".npy"),
                           _NpySource)]


@pytest.fixture()
def npy_plugin() -> Iterator[None]:
    pm = registry.plugin_manager()
    plugin = _NpyPlugin()
    pm.register(plugin, name="npy-show-test")
    try:
        yield
    finally:
        pm.unregister(plugin)


def test_an_input_of_a_plugin_source_is_shown(npy_plugin, tmp_path: Path, capsys) -> None:
    data = np.arange(3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5)
    data[2, 0, 0] = np.nan  # masked by the source: not in the value range
    path = tmp_path / "frames.npy"
    np.save(path, data)
    assert main([str(path), "--json", "--max-frames", "2"]) == 0
    (shown,) = json.loads(capsys.readouterr().out)
    assert (shown["kind"], shown["source_type"]) == ("frames", "npy")
    assert shown["frames"] == 3 and shown["panels"] == 1 and shown["panel_shapes"] == [[4, 5]]
    assert shown["value_range"] == [0.0, 39.0] and shown["value_range_frames"] == 2
    assert main([str(path)]) == 0
    text = capsys.readouterr().out
    assert f"{path} (npy frames)" in text and "frames: 3" in text


def test_without_the_plugin_it_is_an_unknown_file_type(tmp_path: Path, capsys) -> None:
    path = tmp_path / "frames.npy"
    np.save(path, np.zeros((1, 4, 5), np.float32))
    assert main([str(path)]) == 1
    assert "unknown file type" in capsys.readouterr().err


def test_inputs_only_a_plugin_source_reads_are_shown_by_it(install_plugin, tmp_path: Path,
                                                            capsys) -> None:
    """peaknet-show sent every HDF5 file to its CXI summary ("no image dataset found") and
    refused folders, whatever plugin source claimed them (the README's rule: a plugin's sniff
    is asked about the inputs no built-in reads)."""
    from peaknet_test_support import write_packed

    install_plugin("elsewhere", """
        import os

        import numpy as np
        from peaknet_test_support import is_packed
        from peaknet_xtal.builtin.sources import SourceType
        from peaknet_xtal.hookspecs import hookimpl
        from peaknet_xtal.types import Frame

        class Source:
            def __init__(self, name, path):
                self.name, self.path = name, path

            def __len__(self):
                return 1

            def __iter__(self):
                yield Frame(panels=[np.full((4, 6), 7.0, np.float32)], source=self.path)

            def close(self):
                pass

        @hookimpl
        def peaknet_source_types():
            return [SourceType("packed", "HDF5 of another layout", is_packed,
                               lambda p, **_: Source("packed", p)),
                    SourceType("folder", "a folder of frames",
                               lambda p: os.path.isfile(os.path.join(p, "frames.bin")),
                               lambda p, **_: Source("folder", p))]
    """)
    packed = tmp_path / "run.h5"
    write_packed(packed)
    folder = tmp_path / "frames"
    folder.mkdir()
    (folder / "frames.bin").write_bytes(b"")
    assert main([str(packed), str(folder)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert f"{packed} (packed frames)" in out and f"{folder} (folder frames)" in out
    assert "panel shapes: 4 x 6" in out


def test_models_lists_the_families_their_plugins_and_models(install_plugin, capsys) -> None:
    """No command listed the models a plugin adds (a plugin author's trial): --models names
    each family's plugin and models, and the plugins that failed to load."""
    from peaknet_test_support import TINY_FAMILY

    install_plugin("tiny", TINY_FAMILY)
    install_plugin("broken", "raise ImportError('needs libfoo>=2')\n")
    assert main(["--models"]) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[1].startswith("  peaknet: ConvNeXt-V2 backbone, BiFPN neck and segmentation head "
                              "(built-in peaknet_xtal.builtin.models)")
    assert text[2].startswith("    atto, femto, ")
    tiny = text.index("  tinyfam: two convolutions (plugin 'tiny' (entry point tiny = "
                      "tiny_peaknet of tiny-dist 0.1))")
    assert text[tiny + 1] == "    my-tiny"
    assert text[-1] == ("not loaded: plugin 'broken' (entry point broken = broken_peaknet of "
                        "broken-dist 0.1) failed to load (ImportError: needs libfoo>=2)")
    assert main(["--models", "--json"]) == 0
    (shown,) = json.loads(capsys.readouterr().out)
    assert shown["kind"] == "models" and len(shown["not_loaded"]) == 1
    assert [f["family"] for f in shown["families"]] == ["peaknet", "tinyfam"]


def test_without_files_or_models_it_is_a_usage_error(capsys) -> None:
    with pytest.raises(SystemExit) as stopped:
        main([])
    assert stopped.value.code == 2
    assert "give files to summarise, or --models" in capsys.readouterr().err


#: A plugin source of names that are no file, taking a ``detector`` option (``OPENED`` keeps
#: what it was opened with).
_NET = """
    import numpy as np
    from peaknet_xtal.builtin.sources import SourceType
    from peaknet_xtal.hookspecs import hookimpl
    from peaknet_xtal.types import Frame

    OPENED = []

    class Net:
        name = "net"

        def __init__(self, path, **options):
            self.path = path
            OPENED.append((path, options))

        def __len__(self):
            return 1

        def __iter__(self):
            yield Frame(panels=[np.full((4, 6), 7.0, np.float32)], source=self.path, event="//0")

        def close(self):
            pass

    @hookimpl
    def peaknet_source_types():
        return [SourceType("net", "frames over the network", lambda p: p.startswith("net://"),
                           Net, options=("detector",))]
"""


def test_source_options_reach_the_plugin_source_and_unknown_ones_are_refused(
        install_plugin, capsys) -> None:
    """peaknet-show had no --source-option (peaknet2cxi had): a plugin source that needs an
    option (a detector, a run number) could not be shown.  The same flag now, with the same
    parsing and refusals, and the options a source was opened with are in its summary."""
    import sys

    install_plugin("net", _NET)
    assert main(["net://host:5555", "--json", "--source-option", "detector=d1"]) == 0
    (shown,) = json.loads(capsys.readouterr().out)
    assert (shown["source_type"], shown["source_options"]) == ("net", {"detector": "d1"})
    assert sys.modules["net_peaknet"].OPENED == [("net://host:5555", {"detector": "d1"})]
    assert main(["net://host:5555"]) == 0
    assert "source options" not in capsys.readouterr().out  # none given: none said
    for option, said in (("detectr=d1", "--source-option detectr: no registered source type "
                                        "takes it (source options: net: detector"),
                         ("detector", "argument --source-option: 'detector' is not KEY=VALUE")):
        with pytest.raises(SystemExit) as stopped:
            main(["net://host:5555", "--source-option", option])
        assert stopped.value.code == 2
        assert said in capsys.readouterr().err
    assert len(sys.modules["net_peaknet"].OPENED) == 2  # refused before any input was read
