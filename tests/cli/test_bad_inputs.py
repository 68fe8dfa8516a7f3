"""Every bad input through every command that takes it: a clean error or a correct, warned result.

The corpus (``tests/support/peaknet_bad_inputs.py``: damaged CXI stacks, extreme pixel values,
broken geometries, bad model files, streams with broken embedded geometries) is built by code
from one small simulated run.  For each (command, case) the outcome must be either

- ``error``: a non-zero exit status and one line on stderr naming the file and what is wrong,
  with no exception escaping ``main`` (no traceback), or
- ``warn``: exit 0, a warning naming the file, and peaks as on the clean data (the masked pixels
  may cost at most the peaks they touch).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import h5py
import numpy as np
import peaknet_bad_inputs as badinputs
import pytest

from peaknet_xtal.cli import peaknet2cxi, show, stream2labels


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, make_geometry_text):
    return badinputs.build_corpus(tmp_path_factory.mktemp("corpus"), make_geometry_text)


def _cases(kind: str, expect: str | None = None) -> list[str]:
    """Case names known without building the corpus (for parametrize ids)."""
    names = {
        "image": ["nan_pixels", "inf_pixels", "pixels_3e38", "rows_float_max", "frame_all_nan",
                  "frame_all_zero", "panel_all_zero", "uint16_gaps", "int32_gaps",
                  "offset_minus_1000", "boolean_image", "string_dtype", "zero_frames",
                  "data_smaller_than_geometry", "mask_2d_wrong_shape",
                  "mask_3d_wrong_count", "vds_missing_source", "truncated_hdf5",
                  "random_bytes_cxi"],
        "geometry": ["empty", "missing_min_fs", "number_18four", "unknown_panel_in_bad_region",
                     "zero_vector", "nan_corner", "bad_dims", "max_below_min", "res_zero",
                     "bad_mask_bits", "negative_photon_energy", "negative_clen",
                     "overlapping_panels", "binary"],
        "model": ["random_bytes", "truncated", "json_list", "unknown_family",
                  "empty_safetensors", "pickle_renamed"],
        "stream": ["embedded_geometry_18four", "embedded_geometry_overlap"],
    }[kind]
    if expect is None:
        return names
    warned = {"nan_pixels", "inf_pixels", "pixels_3e38", "rows_float_max", "frame_all_nan",
              "frame_all_zero", "panel_all_zero", "uint16_gaps", "int32_gaps",
              "offset_minus_1000"}
    return [n for n in names if (n in warned) == (expect == "warn")]


def _case(corpus, name: str):
    _, cases = corpus
    return next(c for c in cases if c.name == name)


def test_corpus_names_match(corpus):
    _, cases = corpus
    for kind in ("image", "geometry", "model", "stream"):
        assert sorted(c.name for c in cases if c.kind == kind) == sorted(_cases(kind))


def assert_clean_error(rc: int, err: str, case, command: str) -> None:
    assert rc != 0, f"{command} accepted {case.name}"
    lines = [x for x in err.splitlines() if "error" in x.lower() or x.startswith("peaknet-show:")]
    assert "Traceback" not in err
    assert lines, f"{command} {case.name}: no error line in {err!r}"
    first = lines[0]
    assert case.name in first, f"{command} {case.name}: the file is not named: {first}"
    assert case.says.lower() in first.lower(), f"{command} {case.name}: {first}"


def run_peaknet2cxi(args: list[str], out: Path, capsys) -> tuple[int, str]:
    capsys.readouterr()
    rc = peaknet2cxi.main([*args, "-o", str(out), "--threads", "1", "--no-progress"])
    return rc, capsys.readouterr().err


def peaks_per_frame(out: Path) -> list[int]:
    from peaknet_xtal.formats.cxi import read_cxi_peaks

    counts: list[int] = []
    for path in sorted(out.glob("peaks-*.cxi")):
        counts += [int(n) for n in read_cxi_peaks(path).n_peaks]
    return counts


@pytest.fixture(scope="module")
def clean_peaks(corpus, tmp_path_factory):
    base, _ = corpus
    out = tmp_path_factory.mktemp("clean_out")
    assert peaknet2cxi.main([str(base.cxi), "-g", str(base.geom), "-o", str(out),
                             "--threads", "1", "--no-progress"]) == 0
    counts = peaks_per_frame(out)
    assert len(counts) == base.n_frames and sum(counts) > 0
    return counts


# ---------------------------------------------------------------------------- peaknet2cxi

@pytest.mark.parametrize("name", [n for n in _cases("image", "error") if n != "zero_frames"])
def test_peaknet2cxi_image_errors(name, corpus, tmp_path, capsys):
    case = _case(corpus, name)
    rc, err = run_peaknet2cxi([str(case.path), "-g", str(case.geometry)], tmp_path / "out",
                              capsys)
    assert_clean_error(rc, err, case, "peaknet2cxi")


@pytest.mark.parametrize("name", _cases("image", "warn"))
def test_peaknet2cxi_masks_and_warns(name, corpus, clean_peaks, tmp_path, capsys, caplog):
    """Unusable pixels are masked, counted in a warning naming the file, and cost at most the
    peaks they touch: a frame keeps its clean peak count within the number of bad pixels put
    in it (5 per frame; the float-max rows cross at most a handful of peaks)."""
    case = _case(corpus, name)
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        rc, err = run_peaknet2cxi([str(case.path), "-g", str(case.geometry)], out, capsys)
    assert rc == 0, err
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING
                and case.name in r.getMessage()]
    assert warnings, f"no warning naming {case.path}"
    assert any(case.says in w for w in warnings), warnings
    counts = peaks_per_frame(out)
    assert len(counts) == len(clean_peaks)
    if name == "frame_all_nan":
        assert counts[0] == 0 and counts[1:] == clean_peaks[1:]
    elif name == "frame_all_zero":  # a frame without data, kept as a frame without peaks
        assert counts[1] == 0 and counts[::2] == clean_peaks[::2]
    elif name == "panel_all_zero":  # no data there: nothing found on it, stored as masked
        from peaknet_xtal.formats.cxi import read_cxi_peaks

        (cxi,) = out.glob("peaks-*.cxi")
        table = read_cxi_peaks(cxi)
        assert all(np.all(table.raw(i)["peakYPosRaw"] < 128) for i in range(len(table)))
        with h5py.File(cxi, "r") as h5:
            good = h5["/entry_1/data_1/mask"][()] == 1
        assert not good[:, 128:].any() and good[:, :128].mean() > 0.99
    elif name == "offset_minus_1000":
        pass  # not maskable: the warning is the point (peak sums are meaningless)
    else:
        for got, want in zip(counts, clean_peaks, strict=True):
            assert abs(got - want) <= 5, (counts, clean_peaks)


@pytest.mark.parametrize("name", _cases("geometry"))
def test_peaknet2cxi_geometry_errors(name, corpus, tmp_path, capsys):
    case = _case(corpus, name)
    data = case.path.parent / "data.cxi"
    rc, err = run_peaknet2cxi([str(data), "-g", str(case.path)], tmp_path / "out", capsys)
    assert_clean_error(rc, err, case, "peaknet2cxi")


@pytest.mark.parametrize("name", _cases("model"))
def test_peaknet2cxi_model_errors(name, corpus, tmp_path, capsys):
    base, _ = corpus
    case = _case(corpus, name)
    rc, err = run_peaknet2cxi([str(base.cxi), "-g", str(base.geom), "--model", str(case.path)],
                              tmp_path / "out", capsys)
    assert_clean_error(rc, err, case, "peaknet2cxi")
    assert not (case.path.parent / "MARKER").exists(), "a model file ran code"


# ---------------------------------------------------------------------------- peaknet-show

def run_show(args: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = show.main(args)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.mark.parametrize("name", [n for n in _cases("image", "error") if n != "zero_frames"])
def test_show_image_errors(name, corpus, capsys):
    case = _case(corpus, name)
    rc, _, err = run_show([str(case.path), "-g", str(case.geometry)], capsys)
    assert_clean_error(rc, err, case, "peaknet-show")


@pytest.mark.parametrize("name", _cases("image", "warn"))
def test_show_reports_finite_range_and_counts(name, corpus, capsys):
    """The value range is taken over finite pixels and the unusable ones are counted."""
    case = _case(corpus, name)
    rc, out, err = run_show([str(case.path), "-g", str(case.geometry), "--json"], capsys)
    assert rc == 0, err
    (summary,) = json.loads(out)
    low, high = summary["value_range"]
    assert low == low and high == high and abs(high) != float("inf")
    if name in ("nan_pixels", "inf_pixels", "frame_all_nan"):
        assert summary["nonfinite_pixels"] > 0
    if name in ("pixels_3e38", "rows_float_max"):
        assert summary["absurd_pixels"] > 0
    if name == "uint16_gaps":
        assert summary["marker_pixels"] > 0 and high < 65535
    if name == "int32_gaps":
        assert summary["marker_pixels"] > 0 and low >= 0
    if name == "frame_all_zero":
        assert summary["frames_without_data"] == 1
    if name == "panel_all_zero":  # the bottom panel of every frame
        assert summary["one_value_pixels"] == 3 * 128 * 256 and low <= 0.0


def test_show_zero_frame_stack_says_zero(corpus, capsys):
    case = _case(corpus, "zero_frames")
    rc, out, err = run_show([str(case.path), "-g", str(case.geometry), "--json"], capsys)
    assert rc == 0, err
    assert json.loads(out)[0]["frames"] == 0


@pytest.mark.parametrize("name", _cases("geometry"))
def test_show_geometry_errors(name, corpus, capsys):
    case = _case(corpus, name)
    rc, _, err = run_show([str(case.path)], capsys)
    assert_clean_error(rc, err, case, "peaknet-show")


@pytest.mark.parametrize("name", _cases("stream"))
def test_show_stream_with_broken_geometry(name, corpus, capsys):
    case = _case(corpus, name)
    rc, _, err = run_show([str(case.path)], capsys)
    assert_clean_error(rc, err, case, "peaknet-show")


# --------------------------------------------------------------------------- stream2labels

@pytest.mark.parametrize("name", _cases("stream"))
def test_stream2labels_stream_with_broken_geometry(name, corpus, tmp_path, capsys):
    case = _case(corpus, name)
    capsys.readouterr()
    rc = stream2labels.main([str(case.path), "-o", str(tmp_path / "labels.h5"), "--no-ray",
                             "--quiet"])
    assert_clean_error(rc, capsys.readouterr().err, case, "stream2labels")
