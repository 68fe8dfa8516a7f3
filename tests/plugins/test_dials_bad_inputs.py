"""Bad inputs through real ``dials.import`` / ``dials.find_spots algorithm=peaknet`` commands.

DIALS prints its user error (``Sorry``) as one line and anything else as a crash with a traceback
and "Please report this error to dials-support".  Every failure of the project's dxtbx format or
spot-finding plugin must be the former, naming the file; pixels the engine masks must leave
spot finding working, with a warning.  A handful of cases from the shared corpus
(``tests/support/peaknet_bad_inputs.py``) covers each way in: the geometry, the data, the mask,
the model file.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import peaknet_bad_inputs as badinputs
import pytest

from peaknet_xtal.evaluation.dials_commands import dials_environment, dials_program

pytestmark = pytest.mark.dials

ROOT = Path(__file__).resolve().parents[1]
ONE_THREAD = "spotfinder.threshold.peaknet.threads=1"






@pytest.fixture(scope="module")
def env(dials_env):
    return dials_environment(dials_env)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, make_geometry_text):
    return badinputs.build_corpus(tmp_path_factory.mktemp("dials_corpus"), make_geometry_text)


def dials(command: str, args: list[str], cwd: Path, env) -> tuple[int, str]:
    proc = subprocess.run([dials_program(command, env.get("PATH")), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr


def assert_sorry(rc: int, output: str, case) -> None:
    assert rc != 0, output[-2000:]
    assert "Traceback" not in output and "dials-support" not in output, output[-3000:]
    sorry = [line for line in output.splitlines() if line.startswith("Sorry:")]
    assert len(sorry) == 1, output[-3000:]
    assert "direct cause" not in output and "FormatError" not in output, output[-3000:]
    assert case.name in sorry[0] and case.says.lower() in sorry[0].lower(), sorry[0]


def _case(corpus, name: str):
    return next(c for c in corpus[1] if c.name == name)


@pytest.mark.parametrize("name", ["negative_photon_energy", "boolean_image",
                                  "mask_2d_wrong_shape", "vds_missing_source", "truncated_hdf5"])
def test_import_bad_file_is_a_user_error(name, corpus, env, tmp_path):
    case = _case(corpus, name)
    data = case.path.parent / "data.cxi"
    rc, output = dials("import", [str(data)], tmp_path, env)
    assert_sorry(rc, output, case)


@pytest.fixture(scope="module")
def imported(corpus, env, tmp_path_factory):
    """The clean stack imported once, and its spots with the shipped model."""
    base, _ = corpus
    folder = tmp_path_factory.mktemp("clean_import")
    rc, output = dials("import", [str(base.cxi)], folder, env)
    assert rc == 0, output[-3000:]
    return folder


@pytest.mark.parametrize("name", ["random_bytes", "pickle_renamed"])
def test_find_spots_bad_model_is_a_user_error(name, corpus, imported, env, tmp_path):
    case = _case(corpus, name)
    rc, output = dials("find_spots", [str(imported / "imported.expt"), "algorithm=peaknet",
                                      f"spotfinder.threshold.peaknet.model={case.path}",
                                      ONE_THREAD], tmp_path, env)
    assert_sorry(rc, output, case)
    assert not (case.path.parent / "MARKER").exists(), "a model file ran code"


@pytest.mark.parametrize("setting,says", [("threshold=1.5", "must be in [0, 1]"),
                                          ("min_snr=-3", "must be >= 0"),
                                          ("batch_size=0", "must be >= 1"),
                                          ("dilation=-1", "must be >= 0"),
                                          ("threads=0", "must be >= 1")])
def test_find_spots_setting_out_of_range_is_a_user_error(setting, says, imported, env,
                                                         tmp_path):
    """A value out of a setting's range: DIALS' one-line user error naming the setting, as the
    model-file errors are.  With the ranges stated to PHIL (value_min / value_max), DIALS
    refused them while parsing its command line, as a traceback asking users to report the
    error to DIALS' developers; the extension checks them itself."""
    rc, output = dials("find_spots", [str(imported / "imported.expt"), "algorithm=peaknet",
                                      f"spotfinder.threshold.peaknet.{setting}"], tmp_path, env)
    assert rc != 0 and "Traceback" not in output and "dials-support" not in output, \
        output[-3000:]
    sorry = [line for line in output.splitlines() if line.startswith("Sorry:")]
    name, value = setting.split("=")
    assert len(sorry) == 1 and f"spotfinder.threshold.peaknet.{name} = {value}" in sorry[0] \
        and says in sorry[0], sorry


@pytest.mark.parametrize("name", ["pixels_3e38", "uint16_gaps", "int32_gaps"])
def test_find_spots_masks_absurd_pixels_and_warns(name, corpus, imported, env, tmp_path):
    """Five pixels per frame at 3e38, uint16 gap lines at 65535 (the type's largest value) or
    int32 ones at -1 (``finding.sanitise.marked_pixels``) are masked (DIALS' trusted range,
    which the format sets) with a warning naming the file; the spots found on the other pixels
    stay (within five a frame)."""
    from dials.array_family import flex

    rc, output = dials("find_spots", [str(imported / "imported.expt"), "algorithm=peaknet",
                                      ONE_THREAD], imported, env)
    assert rc == 0, output[-3000:]
    clean = len(flex.reflection_table.from_file(str(imported / "strong.refl")))
    case = _case(corpus, name)
    rc, output = dials("import", [str(case.path)], tmp_path, env)
    assert rc == 0, output[-3000:]
    rc, output = dials("find_spots", ["imported.expt", "algorithm=peaknet", ONE_THREAD],
                       tmp_path, env)
    assert rc == 0, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    warned = [line for line in output.splitlines() if "trusted range" in line]
    assert len(warned) == badinputs.N_FRAMES and all(str(case.path) in w for w in warned), warned
    if name.endswith("_gaps"):
        assert all(case.says in w for w in warned), warned
    found = len(flex.reflection_table.from_file(str(tmp_path / "strong.refl")))
    assert clean > 0 and abs(found - clean) <= 5 * badinputs.N_FRAMES, (found, clean)


@pytest.mark.parametrize("nproc", [1, 2])
def test_find_spots_unusable_device_is_a_user_error(nproc, real_data, env, tmp_path):
    """``device=cuda`` where torch sees no GPU stops ``dials.find_spots`` before any image is
    found, with one Sorry line naming the setting and the devices there are, in DIALS' main
    process also when spot finding would run in worker processes."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("torch sees a CUDA GPU here: device=cuda is usable")
    cbf = sorted((real_data / "cspad_thermolysin_stills").glob("*.cbf"))[0]
    rc, output = dials("import", [str(cbf)], tmp_path, env)
    assert rc == 0, output[-3000:]
    rc, output = dials("find_spots", ["imported.expt", "algorithm=peaknet", ONE_THREAD,
                                      "spotfinder.threshold.peaknet.device=cuda",
                                      f"spotfinder.mp.nproc={nproc}"], tmp_path, env)
    assert rc != 0, output[-2000:]
    assert "Traceback" not in output and "dials-support" not in output, output[-3000:]
    sorry = [line for line in output.splitlines() if line.startswith("Sorry:")]
    assert sorry == ["Sorry: peaknet: device 'cuda' (spotfinder.threshold.peaknet.device): "
                     "torch sees no CUDA GPU; available here: auto, cpu"], output[-3000:]
    assert "Finding strong spots" not in output and not (tmp_path / "strong.refl").exists()
