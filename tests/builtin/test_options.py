"""The ``geometry`` option shared by built-in sources and writers."""
from __future__ import annotations

import pytest

from peaknet_xtal.builtin.options import geometry_option
from peaknet_xtal.errors import FormatError
from peaknet_xtal.formats.geometry import Geometry


def test_a_path_is_read_an_object_passes_and_none_stays(tmp_path, make_geometry_text):
    path = tmp_path / "two.geom"
    path.write_text(make_geometry_text(["a", "b"], 48, 24, [(-24, 1), (-24, -25)]))
    geometry = geometry_option(str(path))
    assert isinstance(geometry, Geometry) and [p.name for p in geometry.panels] == ["a", "b"]
    assert [p.name for p in geometry_option(path).panels] == ["a", "b"]  # PathLike too
    assert geometry_option(geometry) is geometry
    assert geometry_option(None) is None


def test_a_bad_geometry_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.geom"
    bad.write_text("this is not a geometry\n")
    with pytest.raises(FormatError, match="bad.geom"):
        geometry_option(str(bad))
