"""evaluate() on a constructed data set: every number in the report is known in advance.

The finders here are scripted: they "find" exactly the peaks each frame's ``meta`` plants for them.
They are registered in ``FINDERS`` for the test (``evaluate`` takes finder *names*, as the CLI
does), because the report's arithmetic must be checked against counts fixed by construction; a real
finder's detections would make the expected numbers depend on the finder instead of the report.
Real finders are checked on their own in ``test_finders.py`` and end to end in
``tests/cli/test_eval.py``.
"""
from __future__ import annotations

import json
import math
import re
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from peaknet_xtal.evaluation import FINDERS
from peaknet_xtal.evaluation.report import Dataset, evaluate, markdown
from peaknet_xtal.types import Frame, empty_peaks, peaks_from_columns

SHAPE = (40, 48)  # (ss, fs) of each of the two panels


@dataclass
class ScriptedFinder:
    """Returns ``frame.meta[name]``: the peaks the test planted for this finder on that frame."""

    params: dict[str, Any] = field(default_factory=dict)
    name: str = "scripted"

    def find(self, frame: Frame) -> np.ndarray:
        return frame.meta.get(self.params["key"], empty_peaks())


def _make(key: str) -> Any:
    def factory(params: dict[str, Any] | None = None) -> ScriptedFinder:
        return ScriptedFinder({"key": key, **(params or {})}, name=key)
    return factory


@pytest.fixture
def scripted(monkeypatch):
    """Two scripted finders, ``sloppy`` and ``oracle``, known to ``create_finder`` for one test."""
    monkeypatch.setitem(FINDERS, "sloppy", _make("sloppy"))
    monkeypatch.setitem(FINDERS, "oracle", _make("oracle"))


def grid_peaks(panel: int, n: int, offset: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """``n`` peaks on a 6 px grid of one panel, shifted by ``offset`` (fs, ss)."""
    fs = 5.0 + 6.0 * (np.arange(n) % 6) + offset[0]
    ss = 5.0 + 6.0 * (np.arange(n) // 6) + offset[1]
    return peaks_from_columns(panel=np.full(n, panel), fs=fs, ss=ss)


def concat(*tables: np.ndarray) -> np.ndarray:
    return np.concatenate(tables) if tables else empty_peaks()


def image_with(peaks: np.ndarray, panel: int) -> np.ndarray:
    rng = np.random.default_rng(panel)
    image = rng.normal(10.0, 1.0, SHAPE).astype(np.float32)
    for row in peaks[peaks["panel"] == panel]:
        image[int(round(row["ss"])), int(round(row["fs"]))] += 100.0
    return image


def constructed() -> tuple[Dataset, dict[str, Any]]:
    """Three frames with hand-made truth and scripted finder output; returns the expected counts.

    frame 0 (hit, panel 0): 12 strong + 2 weak true reflections.  sloppy: 10 strong at 0.3 px,
      1 on a weak reflection (correct, not a recall), 2 far from anything (false).
    frame 1 (blank): sloppy finds 3 false peaks (too few for a hit); oracle finds nothing.
    frame 2 (hit, panel 1): 12 strong.  sloppy: all 12 at 0.5 px, a split spot 1 px beside a
      true peak (one-to-one matching: counts once), a peak on panel 0 at the coordinates of a
      true panel-1 peak (wrong panel: false).
    oracle finds exactly the strong reflections everywhere.
    """
    strong0, weak0 = grid_peaks(0, 12), grid_peaks(0, 14)[12:]
    strong2 = grid_peaks(1, 12)
    sloppy = [
        concat(grid_peaks(0, 10, (0.3, 0.0)), weak0[:1],
               peaks_from_columns(panel=[0, 0], fs=[44.0, 44.0], ss=[30.0, 36.0])),
        peaks_from_columns(panel=[1, 1, 0], fs=[40.0, 42.0, 44.0], ss=[36.0, 36.0, 36.0]),
        concat(grid_peaks(1, 12, (0.3, 0.4)),
               peaks_from_columns(panel=[1, 0], fs=[strong2["fs"][0] - 1.0, strong2["fs"][3]],
                                  ss=[strong2["ss"][0], strong2["ss"][3]])),
    ]
    truths = [strong0, empty_peaks(), strong2]
    reflections = [concat(strong0, weak0), empty_peaks(), strong2]
    frames = []
    for i, (truth, found) in enumerate(zip(truths, sloppy, strict=False)):
        panels = [image_with(truth, 0), image_with(truth, 1)]
        masks = [np.ones(SHAPE, bool), np.ones(SHAPE, bool)]
        masks[1][0, 0] = False
        frames.append(Frame(panels, masks, source="constructed", event=f"//{i}", serial=i,
                            meta={"sloppy": found, "oracle": truth}))
    expected = {"n_found": 13 + 3 + 14, "n_true": 24, "n_matched": 10 + 12,
                "n_correct": 11 + 0 + 12, "median_error_px": 0.5}
    return Dataset("constructed", frames, truths, reflections), expected


def f1(p: float, r: float) -> float:
    return 2 * p * r / (p + r)


def test_scores_and_hit_rate_match_hand_counts(scripted, tmp_path):
    dataset, want = constructed()
    report = evaluate(dataset, ["sloppy", "oracle"], tmp_path, min_peaks=10, samples=1)
    sloppy = report["finders"]["sloppy"]["accuracy"]
    for key, value in want.items():
        assert sloppy[key] == pytest.approx(value), key
    assert sloppy["precision"] == pytest.approx(23 / 30)
    assert sloppy["recall"] == pytest.approx(22 / 24)
    assert sloppy["f1"] == pytest.approx(f1(23 / 30, 22 / 24))
    oracle = report["finders"]["oracle"]["accuracy"]
    assert (oracle["precision"], oracle["recall"], oracle["f1"]) == (1.0, 1.0, 1.0)
    assert oracle["median_error_px"] == 0.0
    # Hits: at least 10 peaks.  sloppy 13, 3, 14 peaks; oracle 12, 0, 12.
    assert report["finders"]["sloppy"]["peaks_per_frame"] == [13, 3, 14]
    assert report["finders"]["sloppy"]["hit_rate"] == pytest.approx(2 / 3)
    assert report["finders"]["oracle"]["hit_rate"] == pytest.approx(2 / 3)
    per_frame = report["finders"]["sloppy"]["per_frame_f1"]
    assert per_frame[0] == pytest.approx(f1(11 / 13, 10 / 12))
    assert per_frame[1] == 0.0  # 3 false peaks on a blank: nothing right
    assert per_frame[2] == pytest.approx(f1(12 / 14, 1.0))
    assert math.isnan(report["finders"]["oracle"]["per_frame_f1"][1])  # nothing to find, none found


def test_tuning_frames_are_left_out_of_scoring(scripted, tmp_path):
    dataset, _ = constructed()
    report = evaluate(dataset, ["sloppy"], tmp_path, tune_frames=1, min_peaks=10, samples=1)
    acc = report["finders"]["sloppy"]["accuracy"]
    assert report["frames"] == 2 and report["tuning_frames"] == 1
    assert (acc["n_found"], acc["n_true"], acc["n_matched"], acc["n_correct"]) == (17, 12, 12, 12)
    assert report["finders"]["sloppy"]["hit_rate"] == pytest.approx(1 / 2)


def test_json_is_strict_and_markdown_shows_the_json_numbers(scripted, tmp_path):
    dataset, _ = constructed()
    report = evaluate(dataset, ["sloppy", "oracle"], tmp_path, min_peaks=10, samples=1)

    def no_constants(name: str) -> None:
        raise AssertionError(f"report.json holds {name}: not strict JSON")

    saved = json.loads((tmp_path / "report.json").read_text(), parse_constant=no_constants)
    assert saved["finders"]["oracle"]["per_frame_f1"][1] is None  # NaN written as null
    assert saved["finders"]["sloppy"]["accuracy"] == pytest.approx(
        report["finders"]["sloppy"]["accuracy"])
    text = (tmp_path / "report.md").read_text()
    assert text == markdown(report, dataset)
    rows = {m[0]: m[1:] for m in re.findall(
        r"^\| (\w+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| [\d.]+ \|$", text, re.M)}
    assert set(rows) == {"sloppy", "oracle"}
    for label, (p, r, f, err) in rows.items():
        acc = saved["finders"][label]["accuracy"]
        assert (float(p), float(r), float(f)) == pytest.approx(
            (acc["precision"], acc["recall"], acc["f1"]), abs=5e-4)
        assert float(err) == pytest.approx(acc["median_error_px"], abs=5e-3)
    hits = dict(re.findall(r"^\| (\w+) \| ([\d.]+) \| not run \| not run \|$", text, re.M))
    assert {k: float(v) for k, v in hits.items()} == pytest.approx(
        {k: saved["finders"][k]["hit_rate"] for k in ("sloppy", "oracle")}, abs=5e-4)
    for name in saved["figures"]:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({name})" in text


def test_overlays_show_the_frame_with_most_true_peaks_and_its_edge_and_artifact(scripted,
                                                                              tmp_path):
    dataset, _ = constructed()
    report = evaluate(dataset, ["oracle"], tmp_path, min_peaks=10, samples=1)
    # Frames 0 and 2 tie at 12 true peaks: the first wins.
    assert [n for n in report["figures"] if n.startswith("overlay")] == [
        "overlay_frame0_panel.png", "overlay_frame0_edge.png", "overlay_frame0_artifact.png"]


def test_without_truth_only_hits_are_reported(scripted, tmp_path):
    dataset, _ = constructed()
    dataset.truths = dataset.reflections = None
    report = evaluate(dataset, ["sloppy"], tmp_path, min_peaks=3, samples=1)
    entry = report["finders"]["sloppy"]
    assert "accuracy" not in entry and entry["hit_rate"] == 1.0
    text = (tmp_path / "report.md").read_text()
    assert "## Accuracy" not in text and "| sloppy | 1.000 | not run | not run |" in text
    assert "scores.png" not in report["figures"]


def test_finder_labels_become_safe_file_names():
    from peaknet_xtal.evaluation.report import slug

    assert slug("peaknet:/runs/x/checkpoints/step_000200/model.safetensors") == "peaknet_model"
    assert slug("peaknet:default") == "peaknet_default"
    assert slug("peakfinder8") == "peakfinder8"


def test_finders_whose_models_share_a_file_name_get_distinct_readable_names():
    """Every peaknet-train output is model.safetensors: the names must still differ (else one
    finder's activation maps overwrite another's), name the folder that tells them apart, be
    safe file names, not depend on anything but the labels, and leave a label that collides
    with nothing its plain slug."""
    from peaknet_xtal.evaluation.report import file_names, slug

    cases = [
        ["peaknet:runs/t1/model.safetensors", "peaknet:runs/d1/model.safetensors",
         "peakfinder8"],
        ["peaknet:a/t1", "peaknet:b/t1", "peaknet:default"],
        ["peaknet:/abs/x/model.safetensors", "peaknet:model.safetensors",
         "peaknet:y/x/model.safetensors"],
        ["peaknet:a b/model", "peaknet:a_b/model", "peaknet:A_B/model"],  # same once made safe
    ]
    for labels in cases:
        names = file_names(labels)
        assert set(names) == set(labels)
        assert len({n.casefold() for n in names.values()}) == len(labels), names
        assert all(re.fullmatch(r"[A-Za-z0-9._-]+", n) for n in names.values()), names
        assert file_names(labels) == names  # a rerun of the same finders: the same files
        for label, name in names.items():
            if [slug(other) for other in labels].count(slug(label)) == 1:
                assert name == slug(label)
            else:
                assert name.startswith(label.partition(":")[0])
    names = file_names(cases[0][:2])
    assert "t1" in names[cases[0][0]] and "d1" in names[cases[0][1]]
    names = file_names(cases[1][:2])
    assert "a_" in names["peaknet:a/t1"] and "b_" in names["peaknet:b/t1"]


@dataclass
class BrokenFinder(ScriptedFinder):
    """The oracle, failing on the second frame as a run that dies half way does."""

    def find(self, frame: Frame) -> np.ndarray:
        if frame.serial == 1:
            raise RuntimeError("broken on purpose")
        return super().find(frame)


@pytest.fixture
def broken(monkeypatch):
    monkeypatch.setitem(FINDERS, "broken", lambda params=None: BrokenFinder(
        {"key": "oracle", **(params or {})}, name="broken"))


def folder_state(folder) -> dict[str, bytes | None]:
    """Every path under ``folder`` (hidden ones too), with a file's bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None
            for p in sorted(folder.rglob("*"))}


def test_a_new_report_replaces_the_earlier_ones_files_and_nothing_else(scripted, fake_dials,
                                                                       tmp_path):
    """A report written over an earlier one leaves none of the earlier one's files that it does
    not write itself (overlays of frames it does not show, a DIALS folder it did not make);
    a file the earlier report did not record (the user's own) stays."""
    dataset, _ = constructed()
    dataset.images = ["run.cxi"]
    out = tmp_path / "report"
    first = evaluate(dataset, ["sloppy", "oracle"], out, min_peaks=10, samples=2, index=True)
    assert (out / "dials").is_dir() and "dials" in first["files"]
    (out / "notes.txt").write_text("the user's own")
    second = evaluate(dataset, ["oracle"], out, min_peaks=10, samples=1)
    gone = set(first["files"]) - set(second["files"])
    assert any(n.startswith("overlay") for n in gone) and "dials" in gone  # the premise
    assert {p.name for p in out.iterdir()} == set(second["files"]) | {"notes.txt"}
    assert set(second["files"]) == {*second["figures"], "report.json", "report.md"}
    assert json.loads((out / "report.json").read_text())["files"] == second["files"]
    assert (out / "notes.txt").read_text() == "the user's own"


def test_a_report_from_before_files_were_recorded_is_replaced_by_its_figures(scripted, tmp_path):
    """A report.json without ``files`` (written before they were recorded) still names its
    figures: those the new report does not write go."""
    dataset, _ = constructed()
    first = evaluate(dataset, ["oracle"], tmp_path, min_peaks=10, samples=2)
    saved = json.loads((tmp_path / "report.json").read_text())
    del saved["files"]
    (tmp_path / "report.json").write_text(json.dumps(saved))
    second = evaluate(dataset, ["oracle"], tmp_path, min_peaks=10, samples=1)
    assert set(first["figures"]) - set(second["figures"])  # the premise: fewer overlays now
    assert {p.name for p in tmp_path.iterdir()} == set(second["files"])


def test_a_failed_report_leaves_the_earlier_one_as_it_was(scripted, broken, tmp_path):
    dataset, _ = constructed()
    out = tmp_path / "report"
    evaluate(dataset, ["sloppy"], out, min_peaks=10, samples=2)
    before = folder_state(out)
    with pytest.raises(RuntimeError, match="broken on purpose"):
        evaluate(dataset, ["oracle", "broken"], out, min_peaks=10, samples=1)
    assert folder_state(out) == before  # no staging folder left either
    with pytest.raises(RuntimeError, match="broken on purpose"):
        evaluate(dataset, ["broken"], tmp_path / "new", min_peaks=10, samples=1)
    assert not (tmp_path / "new").exists()


def test_the_configuration_is_recorded_before_any_work_even_when_the_run_fails(
        scripted, broken, tmp_path, monkeypatch):
    """The command's configuration line came at the end, after every finder and DIALS had run
    (66 s into a user trial), and a run that failed or was stopped logged none: ``record`` now
    comes before the first finder, and what it writes is published with the report."""
    dataset, _ = constructed()
    order: list[str] = []
    make = FINDERS["sloppy"]

    def counted(params=None):
        finder = make(params)
        finder.find = lambda frame: order.append("find") or frame.meta["sloppy"]
        return finder

    monkeypatch.setitem(FINDERS, "sloppy", counted)

    def record(staging):
        order.append("record")
        (staging / "config.json").write_text("{}")

    report = evaluate(dataset, ["sloppy"], tmp_path / "a", min_peaks=10, samples=0,
                      record=record)
    assert order[0] == "record" and order.count("find") == 3, order
    assert "config.json" in report["files"] and (tmp_path / "a" / "config.json").is_file()
    order.clear()
    with pytest.raises(RuntimeError, match="broken on purpose"):
        evaluate(dataset, ["broken"], tmp_path / "b", min_peaks=10, record=record)
    assert order == ["record"] and not (tmp_path / "b").exists()


def test_progress_lines_of_the_finders_and_none_without_progress(scripted, tmp_path, capsys):
    """Each finder's frames are counted on stderr; ``progress=False`` (``--no-progress``)
    leaves stderr empty."""
    dataset, _ = constructed()
    evaluate(dataset, ["sloppy", "oracle"], tmp_path / "a", min_peaks=10, samples=0)
    err = capsys.readouterr().err
    assert "sloppy: 3/3 frames 100.0%" in err and "oracle: 3/3 frames 100.0%" in err, err
    evaluate(dataset, ["sloppy", "oracle"], tmp_path / "b", min_peaks=10, samples=0,
             progress=False)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_while_the_report_is_moved_into_place_waits_until_it_is_whole(
        scripted, tmp_path, monkeypatch, signum):
    """A Ctrl-C or SIGTERM landing while a finished report replaces an earlier one stopped it
    half-way: the new figures beside the earlier report.md.  The stop now waits until the new
    report is whole (and its staging folder gone), and is raised then, as it would have been."""
    import os

    from peaknet_xtal.evaluation import report as report_module
    from peaknet_xtal.stopping import Terminated, sigterm_raises

    dataset, _ = constructed()
    out = tmp_path / "report"
    evaluate(dataset, ["sloppy", "oracle"], out, min_peaks=10, samples=2)
    replace = os.replace
    moved: list[str] = []

    def replace_then_stop(source, target, *args, **kwargs):
        replace(source, target, *args, **kwargs)
        if Path(target).parent == out and Path(source).parent.name.endswith(".partial"):
            moved.append(Path(target).name)
            if len(moved) == 2:  # after the first figures, before report.json and report.md
                os.kill(os.getpid(), signum)

    monkeypatch.setattr(report_module.os, "replace", replace_then_stop)
    expected = Terminated if signum == signal.SIGTERM else KeyboardInterrupt
    with sigterm_raises(), pytest.raises(expected) as stopped:
        evaluate(dataset, ["oracle"], out, min_peaks=10, samples=1)
    assert type(stopped.value) is expected
    published = json.loads((out / "report.json").read_text())
    assert published["finders"].keys() == {"oracle"}  # the new report, whole
    assert {p.name for p in out.iterdir()} == set(published["files"])  # no staging folder
    assert len(moved) == len(published["files"]) > 2


GPCR = (61.5, 91.5, 151.1, 90.0, 98.5, 90.0)
LYSOZYME = (79.1, 79.1, 38.0, 90.0, 90.0, 90.0)


@pytest.fixture
def fake_dials(monkeypatch, tmp_path):
    """``dials.import`` and ``dials.index`` replaced by a recorder: what would DIALS be asked?
    Every frame handed over fails with one made-up reason, so the report must say why."""
    from peaknet_xtal.evaluation import indexing

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(indexing, "import_images", lambda images, workdir: tmp_path / "i.expt")

    def index_frames(imported, tables, workdir, options, min_spots=10, first=0, known=None,
                     progress=True):
        workdir.mkdir(parents=True, exist_ok=True)  # as DIALS' working files would
        calls.append({"first": first, "options": list(options), "known": known,
                      "tables": len(tables)})
        return [indexing.IndexingResult(False, message="Sorry: no lattice for this test")
                for _ in tables]

    monkeypatch.setattr(indexing, "index_frames", index_frames)
    return calls


def test_each_frame_is_indexed_with_its_own_crystal(scripted, fake_dials, tmp_path, caplog):
    """A run of different crystals (peaknet-sim without a fixed cell): each scored frame gets its
    crystal's cell and lattice, never one cell for all; tuning frames are not handed over."""
    from peaknet_xtal.evaluation.indexing import KnownSymmetry

    dataset, _ = constructed()
    dataset.known_symmetry = [KnownSymmetry("P4", LYSOZYME), KnownSymmetry(),
                              KnownSymmetry("C2", GPCR)]
    dataset.images = ["run.cxi"]
    report = evaluate(dataset, ["oracle"], tmp_path, tune_frames=1, min_peaks=10, samples=1,
                      index=True)
    (call,) = fake_dials
    assert call["first"] == 1 and call["tables"] == 2
    assert not any("known_symmetry" in o for o in call["options"])
    assert call["known"] == [[], ["indexing.known_symmetry.space_group=C2",
                                  "indexing.known_symmetry.unit_cell=61.5,91.5,151.1,90,98.5,90"]]
    assert "each frame's own crystal" in report["indexing"]["known_symmetry"]
    # DIALS' reason for the one hit it did not index is counted, logged and shown.
    assert report["indexing"]["oracle"]["failures"] == {"Sorry: no lattice for this test": 1}
    assert "oracle: 1 of 1 hits not indexed: 1 x Sorry: no lattice for this test" in caplog.text
    text = (tmp_path / "report.md").read_text()
    assert "| oracle | 1 | Sorry: no lattice for this test |" in text


def test_symmetry_the_user_gives_is_used_for_every_frame(scripted, fake_dials, tmp_path):
    """--space-group / --unit-cell replace the truth's, each on its own: a space group alone
    keeps each frame's own cell (a lysozyme run indexed in P43212)."""
    from peaknet_xtal.evaluation.indexing import KnownSymmetry

    dataset, _ = constructed()
    dataset.known_symmetry = [KnownSymmetry("P4", LYSOZYME)] * 3
    dataset.images = ["run.cxi"]
    dataset.space_group = "P43212"
    evaluate(dataset, ["oracle"], tmp_path, min_peaks=10, samples=1, index=True)
    dataset.unit_cell = (79.0, 79.0, 38.1, 90.0, 90.0, 90.0)
    evaluate(dataset, ["oracle"], tmp_path, min_peaks=10, samples=1, index=True)
    sg_only, both = fake_dials
    assert sg_only["known"] == [["indexing.known_symmetry.space_group=P43212",
                                 "indexing.known_symmetry.unit_cell=79.1,79.1,38,90,90,90"]] * 3
    assert both["known"] == [["indexing.known_symmetry.space_group=P43212",
                              "indexing.known_symmetry.unit_cell=79,79,38.1,90,90,90"]] * 3


def test_a_sim_run_of_different_crystals_knows_each_frames_crystal(real_data, tmp_path):
    from peaknet_xtal.evaluation.report import load_sim_run
    from peaknet_xtal.formats.geometry import read_geometry
    from peaknet_xtal.sim import SimConfig
    from peaknet_xtal.sim.output import read_truth
    from peaknet_xtal.sim.run import simulate_run

    geometry = read_geometry(real_data / "crystfel_geometry" / "psgeom_cspad-2x2-approx1.geom")
    simulate_run(geometry, 4, 1, tmp_path / "mixed", SimConfig(), stream=False, progress=False)
    simulate_run(geometry, 2, 1, tmp_path / "one", SimConfig(cell="lysozyme"), stream=False,
                 progress=False)
    mixed = load_sim_run(tmp_path / "mixed")
    crystals = read_truth(tmp_path / "mixed" / "sim_truth.h5")["crystals"]
    assert len({tuple(c) for c in crystals["cell"]}) > 1  # the premise: different crystals
    for row in crystals[crystals["crystal"] == 0]:
        assert mixed.known_symmetry[row["frame"]].unit_cell == tuple(row["cell"])
    assert mixed.reference_cell is None  # no one cell to draw on the histograms
    assert load_sim_run(tmp_path / "one").reference_cell == pytest.approx(LYSOZYME)


@pytest.mark.dials
@pytest.mark.slow
def test_true_peaks_of_different_crystals_index(real_data, dials_env, scripted, tmp_path):
    """The user's run: peaknet-sim on the CSPAD without a cell (frames 2 and 3 of seed 1 are
    myoglobin and trypsin).  The exact strong peaks must index on every hit, through the real
    dials.index; one median cell for the run indexed none."""
    from peaknet_xtal.evaluation.report import load_sim_run
    from peaknet_xtal.formats.geometry import read_geometry
    from peaknet_xtal.sim import SimConfig
    from peaknet_xtal.sim.run import simulate_run

    geometry = read_geometry(real_data / "crystfel_geometry" / "crystfel_doc_cspad-cxiformat.geom")
    simulate_run(geometry, 4, 1, tmp_path / "sim", SimConfig(), stream=False, progress=False)
    dataset = load_sim_run(tmp_path / "sim")
    for frame, truth in zip(dataset.frames, dataset.truths, strict=True):
        frame.meta["oracle"] = peaks_from_columns(panel=truth["panel"], fs=truth["fs"],
                                                  ss=truth["ss"], intensity=truth["photons"])
    report = evaluate(dataset, ["oracle"], tmp_path / "report", tune_frames=2, samples=0,
                      index=True)
    rates = report["indexing"]["oracle"]
    assert (rates["hits"], rates["indexed"]) == (2, 2), rates["failures"]
