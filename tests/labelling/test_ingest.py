"""Ingest: streams and DIALS stills results become records; images are found like indexamajig."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from peaknet_xtal.builtin.sources import SourceType
from peaknet_xtal.errors import FormatError
from peaknet_xtal.hookspecs import hookimpl
from peaknet_xtal.labelling.ingest import (
    PRED_DTYPE,
    event_index,
    load_frame,
    records_from_dials,
    records_from_stream,
    resolve_image,
    stream_geometry,
)
from peaknet_xtal.types import Frame


def test_event_index():
    assert event_index("//5") == 5
    assert event_index("//") == 0 and event_index(None) == 0
    assert event_index("event1//") == -1


def test_resolve_image_like_indexamajig(tmp_path):
    assert resolve_image("r1.cxi", "/data/run7/", tmp_path) == "/data/run7/r1.cxi"
    assert resolve_image("r1.cxi", "/data/run7-", tmp_path) == "/data/run7-r1.cxi"  # literal
    (tmp_path / "r1.cxi").write_bytes(b"")
    assert resolve_image("r1.cxi", None, tmp_path) == str(tmp_path / "r1.cxi")
    assert resolve_image("/abs/r1.cxi", None, tmp_path) == "/abs/r1.cxi"


def test_simulated_stream_round_trip(sim_run):
    """Records carry panel-relative coordinates that land on the true reflections."""
    from peaknet_xtal.sim.output import read_truth

    truth = read_truth(sim_run.truth)["reflections"]
    records = list(records_from_stream(sim_run.stream))
    assert len(records) >= sim_run.n_frames - 1
    for rec in records:
        frame = event_index(rec.event)
        rows = truth[truth["frame"] == frame]
        assert rec.image == str(sim_run.cxi.resolve())
        assert len(rec.predicted) == len(rows)
        # streams keep 2 decimals (peaks) and 1 decimal (reflections)
        assert np.allclose(rec.predicted["fs"], rows["fs"], atol=0.051)
        assert np.array_equal(rec.predicted["panel"], rows["panel"])
        assert len(rec.found) == int(rows["strong"].sum())
    with pytest.raises(FormatError, match="geometry"):
        load_frame(records[0], None)
    frame = load_frame(records[0], stream_geometry(sim_run.stream))
    assert [p.shape for p in frame.panels] == [(192, 384), (192, 384)]
    assert frame.masks is not None


def test_a_chunk_repeated_in_the_stream_is_labelled_once(sim_run, tmp_path, caplog):
    """A stream concatenated with itself (``cat a.stream a.stream``) gave every frame two label
    rows; the repeats are skipped with one warning."""
    text = sim_run.stream.read_text()
    start = text.index("----- Begin chunk -----")
    twice = tmp_path / "twice.stream"
    twice.write_text(text.replace(f"Image filename: {sim_run.cxi.name}",
                                  f"Image filename: {sim_run.cxi}") + text[start:].replace(
        f"Image filename: {sim_run.cxi.name}", f"Image filename: {sim_run.cxi}"))
    once = list(records_from_stream(sim_run.stream))
    with caplog.at_level("WARNING"):
        again = list(records_from_stream(twice))
    assert [(r.image, r.event) for r in again] == [(r.image, r.event) for r in once]
    said = [r.getMessage() for r in caplog.records if "more than once" in r.getMessage()]
    assert len(said) == 1 and f"{len(once)} frame(s)" in said[0] and str(twice) in said[0]
    assert "the copies are identical" in said[0]


def test_events_of_a_placeholder_file_are_read_through_the_streams_geometry(sim_run,
                                                                            tmp_path):
    """A stream over a SACLA-style file (``data = /%/data``, events ``tag_N//``): its frames
    are read through the geometry, as peaknet2cxi reads them (they fell to dxtbx's sniffing,
    which has no reader for them: "no image format understands this file")."""
    import h5py

    from peaknet_xtal.formats.cxi import iter_cxi_frames
    from peaknet_xtal.formats.geometry import parse_geometry, read_geometry

    stacked = read_geometry(sim_run.geom)
    text = "\n".join(line for line in sim_run.geom.read_text().splitlines()
                     if not line.strip().startswith(("dim", "data")))
    text = "data = /%/data\n" + text + "\n"
    geometry = parse_geometry(text)
    events = tmp_path / "events.h5"
    slabs = [stacked.assemble_slab(f.panels) for f in iter_cxi_frames(sim_run.cxi, stacked)]
    with h5py.File(events, "w") as h5:
        for i, slab in enumerate(slabs):
            h5[f"/tag_{i}/data"] = slab
    stream = tmp_path / "events.stream"
    body = sim_run.stream.read_text().replace(f"Image filename: {sim_run.cxi.name}",
                                              f"Image filename: {events}")
    for i in range(len(slabs)):
        body = body.replace(f"Event: //{i}\n", f"Event: tag_{i}//\n")
    stream.write_text(body)
    records = list(records_from_stream(stream, geometry=geometry))
    assert records and all(r.event.startswith("tag_") for r in records)
    for rec in records[:2]:
        frame = load_frame(rec, geometry)
        index = int(rec.event[len("tag_"):].rstrip("/"))
        np.testing.assert_array_equal(geometry.assemble_slab(frame.panels), slabs[index])


def test_missing_image_names_the_file(sim_run, tmp_path):
    rec = next(records_from_stream(sim_run.stream, prefix=str(tmp_path) + "/"))
    with pytest.raises(FormatError, match="not found"):
        load_frame(rec)


def test_dials_stills_results(real_data, dials_env):
    base = real_data / "dials_stills_results_cxi78513"
    records = list(records_from_dials(base / "stills.expt", base / "stills.refl"))
    assert len(records) == 3
    assert sum(len(r.predicted) for r in records) == 502
    assert sum(len(r.found) for r in records) == 77  # rows flagged strong
    assert all(r.kind == "dxtbx" and len(r.panel_names) == 64 for r in records)
    assert os.path.basename(records[0].image) == "idx-20130301054738747.cbf"
    first = records[0]
    # xyzcal.px of the first row is (31.4177, 28.4739) with the pixel corner as origin
    assert (first.predicted["fs"][0], first.predicted["ss"][0]) == pytest.approx(
        (31.417698 - 0.5, 28.473884 - 0.5), abs=1e-5)
    from peaknet_xtal.labelling.peakdiff import peakdiff

    diffs = [peakdiff(r.found, r.predicted, 5.0) for r in records]
    assert all(d.n_matched >= 0.9 * d.n_found for d in diffs)  # strong spots were indexed


@pytest.mark.dials
def test_a_refl_of_another_experiment_list_is_refused_naming_it(real_data, dials_env, tmp_path):
    """Reflections were paired with experiments by row number alone, so another run's .refl
    labelled these images; DIALS pairs them by the identifiers dials.import sets, and so does
    this now (files without identifiers, as the shared ones, by their ids' range)."""
    from dials.array_family import flex
    from dxtbx.model.experiment_list import ExperimentList

    from peaknet_xtal.errors import FormatError

    base = real_data / "dials_stills_results_cxi78513"
    experiments = ExperimentList.from_file(str(base / "stills.expt"), check_format=False)
    table = flex.reflection_table.from_file(str(base / "stills.refl"))
    for k, experiment in enumerate(experiments):
        experiment.identifier = f"run-a-{k}"
        table.experiment_identifiers()[k] = f"run-a-{k}"
    experiments.as_file(str(tmp_path / "a.expt"))
    table.as_file(str(tmp_path / "a.refl"))
    assert len(list(records_from_dials(tmp_path / "a.expt", tmp_path / "a.refl"))) == 3
    for k in range(len(experiments)):
        table.experiment_identifiers()[k] = f"run-b-{k}"
    table.as_file(str(tmp_path / "b.refl"))
    with pytest.raises(FormatError, match=r"b.refl: experiment 0 is 'run-b-0' here and "
                       r"'run-a-0' in .*a.expt: these reflections belong to another"):
        list(records_from_dials(tmp_path / "a.expt", tmp_path / "b.refl"))
    # dials.index keeps the spots it could not index, as id -1: of no experiment, and no
    # reason to refuse its own output (it was refused); they label no image
    unindexed = flex.reflection_table.from_file(str(base / "stills.refl"))
    ids = unindexed["id"]
    unindexed["id"] = flex.int([-1 if k % 4 == 0 else ids[k] for k in range(unindexed.size())])
    unindexed.as_file(str(tmp_path / "unindexed.refl"))
    records = list(records_from_dials(base / "stills.expt", tmp_path / "unindexed.refl"))
    assert len(records) == 3 and 0 < sum(len(r.predicted) for r in records) < 502
    plain = flex.reflection_table.from_file(str(base / "stills.refl"))
    plain["id"] = flex.int(plain.size(), 5)
    plain.as_file(str(tmp_path / "far.refl"))
    with pytest.raises(FormatError, match=r"far.refl: has reflections of experiment 5, but "
                       r".*stills.expt holds 3 experiment"):
        list(records_from_dials(base / "stills.expt", tmp_path / "far.refl"))


@pytest.mark.dials
def test_dials_run_accounts_for_frames_whose_images_are_gone(real_data, dials_env, tmp_path):
    """The stills' CBFs are not shipped: every selected frame is unreadable, nothing crashes,
    and the run says so, writing no label file (an empty one would pass for a result)."""
    from peaknet_xtal.labelling.job import NothingToLabel, label_run

    base = real_data / "dials_stills_results_cxi78513"
    out = tmp_path / "dials.h5"
    with pytest.raises(NothingToLabel) as caught:
        label_run([str(base / "stills.expt"), str(base / "stills.refl")], out,
                  {"peakdiff": {"min_found": 5, "min_precision": 0.5},
                   "run": {"ray": False}}, progress=False)
    message = str(caught.value)
    assert "selected frames could be labelled" in message and "unreadable" in message
    assert "idx-20130301054738747.cbf" in message and "--prefix" in message
    assert not out.exists() and not (tmp_path / "dials.h5.parts").exists()


class _Marker:
    """Unpickling this writes ``marker``: proof that a loader ran code from a file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


@pytest.mark.dials
def test_stream2labels_refuses_a_pickled_refl(real_data, dials_env, tmp_path, capsys):
    """DIALS' own loader unpickles any .refl that is not msgpack: a crafted one ran code.
    stream2labels now refuses it, naming the file and the option that would allow it."""
    import pickle
    import shutil

    from peaknet_xtal.cli.stream2labels import main

    base = real_data / "dials_stills_results_cxi78513"
    shutil.copy(base / "stills.expt", tmp_path / "stills.expt")
    marker = tmp_path / "MARKER"
    (tmp_path / "evil.refl").write_bytes(pickle.dumps(_Marker(marker)))
    rc = main([str(tmp_path / "stills.expt"), str(tmp_path / "evil.refl"),
               "-o", str(tmp_path / "labels.h5"), "--no-ray", "--quiet"])
    err = capsys.readouterr().err
    assert rc != 0 and "evil.refl" in err and "--trust-pickle" in err and "Traceback" not in err
    assert not marker.exists()


@pytest.mark.dials
def test_a_trusted_pickled_refl_still_reads(real_data, dials_env, tmp_path):
    """Old pickled tables stay readable when the user says they trust them."""
    import pickle

    from dials.array_family import flex

    from peaknet_xtal.errors import FormatError
    from peaknet_xtal.formats.dials_tables import read_reflections

    base = real_data / "dials_stills_results_cxi78513"
    table = flex.reflection_table.from_file(str(base / "stills.refl"))
    old = tmp_path / "old.refl"
    old.write_bytes(pickle.dumps(table))
    with pytest.raises(FormatError, match="not msgpack"):
        read_reflections(old)
    cols = read_reflections(old, ["id", "panel"], trust_pickle=True)
    assert len(cols["id"]) == len(table)


class _RunPlugin:
    """A third-party source of non-file frames with opaque event keys (as psana's timestamps):
    no ``frame_at``, so the loader reads it in order."""

    opened: list[str] = []

    class Run:
        name = "run"

        def __init__(self, path: str) -> None:
            self.path = path
            _RunPlugin.opened.append(path)

        def __iter__(self):
            for t in (1700000000001, 1700000000002):
                yield Frame(panels=[np.full((4, 6), t % 1000, np.float32)], source=self.path,
                            event=f"//{t}")

        def close(self) -> None:
            """Nothing held open."""

    @hookimpl
    def peaknet_source_types(self):
        return [SourceType("run", "toy run", lambda p: p.startswith("exp=toy:"),
                           lambda p, **_: _RunPlugin.Run(p))]


def test_records_of_a_plugin_source_are_loaded_through_the_registry():
    """The data engine reads images through the registered sources, so a plugin's data (e.g.
    an LCLS run) can be labelled like files; records of one source reuse one open source."""
    from peaknet_xtal import registry
    from peaknet_xtal.labelling.ingest import FrameLoader, FrameRecord
    from peaknet_xtal.types import empty_peaks

    pm = registry.plugin_manager()
    plugin = _RunPlugin()
    pm.register(plugin, name="run-test")
    _RunPlugin.opened.clear()
    try:
        records = [FrameRecord(source="/x.stream", image="exp=toy:run=7",
                               event=f"//{t}", index=event_index(f"//{t}"), found=empty_peaks(),
                               predicted=np.zeros(0, PRED_DTYPE), panel_names=["p0"])
                   for t in (1700000000002, 1700000000001)]
        with FrameLoader() as loader:
            frames = [loader.load(r) for r in records]
        assert [f.panels[0][0, 0] for f in frames] == [2.0, 1.0]
        assert _RunPlugin.opened == ["exp=toy:run=7"]
        with pytest.raises(FormatError, match="no frame with event"):
            load_frame(FrameRecord(source="/x.stream", image="exp=toy:run=7", event="//5",
                                   index=5, found=empty_peaks(),
                                   predicted=np.zeros(0, PRED_DTYPE)))
        with pytest.raises(FormatError, match="not found"):
            load_frame(FrameRecord(source="/x.stream", image="/nowhere/run.h5", event="//0",
                                   index=0, found=empty_peaks(),
                                   predicted=np.zeros(0, PRED_DTYPE)))
    finally:
        pm.unregister(plugin)


_GEOM = """clen = 0.1
res = 10000
photon_energy = 9000
adu_per_photon = 1
data = /entry_1/data_1/data
dim0 = %
dim1 = ss
dim2 = fs
{p}/min_fs = 0
{p}/max_fs = 63
{p}/min_ss = 0
{p}/max_ss = 63
{p}/fs = +1.0x +0.0y
{p}/ss = +0.0x +1.0y
{p}/corner_x = -32
{p}/corner_y = -32
"""


def _run_text(tmp_path, name, panel, shift=0.0, event="//{i}"):
    """A one-run stream of three indexed frames of ``run.h5`` through panel ``panel``."""
    from peaknet_xtal.formats.stream import (
        REFLECTION_DTYPE,
        STREAM_PEAK_DTYPE,
        Chunk,
        Crystal,
        write_stream,
    )

    chunks = []
    for i in range(3):
        peaks = np.zeros(2, STREAM_PEAK_DTYPE)
        peaks["fs"], peaks["ss"], peaks["panel"] = [10.5, 20.5], [5.5, 6.5], panel
        refl = np.zeros(2, REFLECTION_DTYPE)
        refl["fs"], refl["ss"], refl["panel"] = peaks["fs"] + shift, peaks["ss"], panel
        chunks.append(Chunk(filename="run.h5", event=event.format(i=i), serial=i + 1, num_peaks=2,
                            peaks=peaks, crystals=[Crystal(reflections=refl)]))
    path = tmp_path / name
    write_stream(path, chunks, geometry_text=_GEOM.format(p=panel))
    return path


def test_a_frame_in_several_streams_is_labelled_once_from_the_later_run(tmp_path, caplog):
    """The same frames in two streams were labelled once per stream, silently (duplicates can
    land on both sides of a training/validation split), while the same streams ``cat``-ed gave
    one each: now both give one record per frame, the later stream's, with one warning naming
    the streams and the frames repeated."""
    from peaknet_xtal.labelling.job import ingest

    first = _run_text(tmp_path, "first.stream", "p0")
    second = _run_text(tmp_path, "second.stream", "p0", shift=1.0)
    with caplog.at_level("WARNING"):
        records, _ = ingest([str(first), str(second)], {"prefix": None, "geometry": None})
    assert [r.event for r in records] == ["//0", "//1", "//2"]
    assert {r.source for r in records} == {str(second)}
    said = [r.getMessage() for r in caplog.records if "more than once" in r.getMessage()]
    assert len(said) == 1
    assert str(first) in said[0] and str(second) in said[0] and "3 frame(s)" in said[0]
    assert "last copy" in said[0] and "3 in crystals" in said[0]


def test_a_rerun_appended_with_another_geometry_wins_and_is_read_through_its_own(tmp_path,
                                                                                caplog):
    """Two runs ``cat``-ed into one file, the second with its panels renamed: the first copy
    won, with a warning that said neither which nor that they differ.  The later run is kept,
    read through the geometry of its own header, and the warning says so."""
    from peaknet_xtal.labelling.job import ingest

    old = _run_text(tmp_path, "old.stream", "p0")
    new = _run_text(tmp_path, "new.stream", "q0", shift=1.0)
    both = tmp_path / "both.stream"
    both.write_text(old.read_text() + new.read_text())
    with caplog.at_level("WARNING"):
        records, geometries = ingest([str(both)], {"prefix": None, "geometry": None})
    assert len(records) == 3
    assert [p.name for p in geometries[records[0].geometry_key].panels] == ["q0"]
    assert np.allclose(records[0].predicted["fs"], [11.0, 21.0])  # the second run's
    said = [r.getMessage() for r in caplog.records if "more than once" in r.getMessage()]
    assert len(said) == 1 and f"more than once in {both}" in said[0]
    assert "last copy" in said[0] and "3 in geometry" in said[0]


def test_an_event_path_the_geometry_has_no_placeholder_for_is_said_once(tmp_path):
    """Events ``entry_1//N`` with a geometry whose data path has no ``%``: every frame failed as
    "event 'entry_1//0' does not name a frame number".  The event's path part fills the
    geometry's ``%`` (as CrystFEL reads it): one error names the path part, the geometry, its
    data path and the stream line."""
    from peaknet_xtal.labelling.job import ingest

    stream = _run_text(tmp_path, "entry.stream", "p0", event="entry_1//{i}")
    with pytest.raises(FormatError) as exc:
        ingest([str(stream)], {"prefix": None, "geometry": None})
    text = str(exc.value)
    assert "'entry_1'" in text and "no '%'" in text and "/entry_1/data_1/data" in text
    assert f"geometry embedded in {stream}" in text and "line " in text


def test_an_hdf5_image_the_cxi_reader_cannot_read_goes_to_the_plugin_claiming_it(
        install_plugin, tmp_path, make_geometry_text):
    """With a geometry, the data engine read every HDF5 image through the CXI reader (sniffing
    looks only at its default data paths), so an HDF5 format of a plugin's failed there
    however the plugin's sniff would have claimed it."""
    from peaknet_test_support import write_packed

    from peaknet_xtal.formats.geometry import parse_geometry
    from peaknet_xtal.labelling.ingest import FrameLoader, FrameRecord
    from peaknet_xtal.types import empty_peaks

    install_plugin("packed", """
        import numpy as np
        from peaknet_test_support import is_packed
        from peaknet_xtal.builtin.sources import SourceType
        from peaknet_xtal.hookspecs import hookimpl
        from peaknet_xtal.types import Frame

        class Packed:
            name = "packed"

            def __init__(self, path):
                self.path = path

            def __iter__(self):
                for i in range(2):
                    yield Frame(panels=[np.full((4, 6), i, np.float32)], source=self.path,
                                event=f"//{i}", serial=i)

            def close(self):
                pass

        @hookimpl
        def peaknet_source_types():
            return [SourceType("packed", "HDF5 of another layout", is_packed,
                               lambda p, **_: Packed(p))]
    """)
    image = tmp_path / "run.h5"
    write_packed(image)
    geometry = parse_geometry(make_geometry_text(["p0"], 6, 4, [(-3, -2)]))
    record = FrameRecord(source="/x.stream", image=str(image), event="//1", index=1,
                         found=empty_peaks(), predicted=np.zeros(0, PRED_DTYPE))
    with FrameLoader() as loader:
        frame = loader.load(record, geometry)
    assert frame.event == "//1" and frame.panels[0][0, 0] == 1.0
