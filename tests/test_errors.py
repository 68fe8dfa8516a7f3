"""The package's errors travel between processes intact (Ray actors raise them far from users)."""
from __future__ import annotations

import pickle

import pytest
from ray import cloudpickle  # what Ray sends an actor's exception with

import peaknet_xtal.config
import peaknet_xtal.labelling.job  # noqa: F401  (registers its FormatError subclass)
from peaknet_xtal.errors import FormatError


def _every_format_error() -> list[type[FormatError]]:
    found, todo = [], [FormatError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


@pytest.mark.parametrize("cls", _every_format_error(), ids=lambda c: c.__name__)
@pytest.mark.parametrize("dumps", [pickle.dumps, cloudpickle.dumps], ids=["pickle", "cloudpickle"])
def test_a_format_error_pickles_with_its_file_place_and_message(cls, dumps):
    error = cls("/data/run7.cxi", "no image dataset", line=12, dataset="/entry_1/data_1/data")
    error.hint = "use another output folder"  # what a raiser adds to it travels too
    back = pickle.loads(dumps(error))
    assert type(back) is cls
    assert (back.path, back.message, back.line, back.dataset) == (
        "/data/run7.cxi", "no image dataset", 12, "/entry_1/data_1/data")
    assert str(back) == str(error)
    assert back.hint == "use another output folder"


def test_config_errors_are_format_errors():
    assert issubclass(peaknet_xtal.config.ConfigError, FormatError)


def test_torch_running_out_of_memory_becomes_a_memory_error_and_nothing_else_does():
    """Torch's CPU allocator says it with a RuntimeError (a real one here), numpy with a
    MemoryError: one type for every entry point to say it by."""
    import torch

    from peaknet_xtal.errors import out_of_memory_as_memory_error

    with pytest.raises(MemoryError, match="ran out of memory .*can't allocate memory"):
        with out_of_memory_as_memory_error():
            torch.empty(2 ** 50, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        with out_of_memory_as_memory_error():
            torch.ones(2, 3) @ torch.ones(2, 3)
