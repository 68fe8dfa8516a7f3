"""The one ``--source-option`` implementation every command that reads frames uses."""
from __future__ import annotations

import argparse

import pytest

from peaknet_xtal import source_option
from peaknet_xtal.errors import PeakNetError

#: Two plugin source types declaring options, one of them shared.
_TWO = """
    from peaknet_xtal.builtin.sources import SourceType
    from peaknet_xtal.hookspecs import hookimpl

    @hookimpl
    def peaknet_source_types():
        never = lambda p: False
        opens = lambda p, **o: None
        return [SourceType("net", "frames over the network", never, opens,
                           options=("detector", "port")),
                SourceType("run", "a facility's run", never, opens,
                           options=("detector", "calibration"))]
"""


def test_each_source_type_gets_the_options_it_declares(install_plugin) -> None:
    install_plugin("two", _TWO)
    given = {"detector": "d1", "port": "5555", "calibration": "/cal.h5"}
    source_option.check(given)
    assert source_option.for_type("net", given) == {"detector": "d1", "port": "5555"}
    assert source_option.for_type("run", given) == {"detector": "d1", "calibration": "/cal.h5"}
    assert source_option.for_type("cxi", given) == {}  # the built-ins declare none


def test_an_undeclared_key_is_one_error_naming_it_and_the_types_that_take_options(
        install_plugin) -> None:
    install_plugin("two", _TWO)
    install_plugin("broken", "import a_module_not_installed\n")
    with pytest.raises(PeakNetError) as said:
        source_option.check({"geometry": "x.geom", "detectr": "d1", "detector": "d1"})
    text = str(said.value)
    assert text.startswith("--source-option detectr, geometry: no registered source type takes "
                           "it (the geometry: -g) (source options: net: detector, port; run: "
                           "detector, calibration"), text  # then any other plugin's (psana)
    assert "); not loaded: plugin 'broken'" in text


def test_the_flag_is_read_into_the_commands_setting(capsys) -> None:
    parser = argparse.ArgumentParser(prog="cmd")
    source_option.add_argument(parser)
    args = parser.parse_args(["--source-option", "detector=d1", "--source-option", "x=a=b"])
    source_option.take(parser, args, "run.source_options")
    assert vars(args) == {"run.source_options": {"detector": "d1", "x": "a=b"}}
    args = parser.parse_args([])
    source_option.take(parser, args)
    assert "source_options" not in vars(args)
    with pytest.raises(SystemExit):
        source_option.take(parser, parser.parse_args(["--source-option", "=d1"]))
    assert "argument --source-option: '=d1' is not KEY=VALUE" in capsys.readouterr().err

