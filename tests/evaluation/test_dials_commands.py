"""evaluation/dials_commands.py: DIALS' reason for a failure, read from its output."""
from __future__ import annotations

from peaknet_xtal.evaluation.dials_commands import dials_reason

#: The end of a failed ``dials.index`` of a still (DIALS 3.12's words, wrapped as it prints them).
UNIT_CELL_TOO_SMALL = """\
Found max_cell: 169.5 Angstrom
Setting d_min: 3.40
Sorry: Unit cell volume is too small for the number of reflections: to disable this
sanity check set disable_unit_cell_volume_sanity_check=True.
"""


def test_the_reason_is_dials_whole_last_words_not_their_last_line():
    """The last line alone was a fragment ("sanity check set ...=True.") that said nothing."""
    reason = dials_reason(UNIT_CELL_TOO_SMALL)
    assert reason.startswith("Sorry: Unit cell volume is too small")
    assert reason.endswith("disable_unit_cell_volume_sanity_check=True.")


def test_an_exception_is_a_reason_and_the_last_one_wins():
    text = ("Sorry: an earlier complaint\nmore output\nTraceback (most recent call last):\n"
            '  File "x.py", line 1\nRuntimeError: No suitable lattice could be found.\n')
    assert dials_reason(text) == "RuntimeError: No suitable lattice could be found."


def test_without_last_words_the_last_line_and_a_limit():
    assert dials_reason("one\ntwo\n\n") == "two"
    assert dials_reason("") == ""
    assert len(dials_reason("Sorry: " + "x" * 500, limit=50)) == 50


def test_a_frame_that_does_not_index_carries_the_whole_reason(tmp_path, monkeypatch):
    """What peaknet-eval counts per reason (indexing.summarise) is DIALS' whole last words."""
    from peaknet_xtal.evaluation import dials_commands
    from peaknet_xtal.evaluation.indexing import index_strong

    def failing(command, *args, **kwargs):
        raise dials_commands.DialsCommandError(f"dials.{command} exited 1:\n"
                                               + UNIT_CELL_TOO_SMALL)

    monkeypatch.setattr(dials_commands, "run_dials", failing)
    result = index_strong(tmp_path, [], env={})
    assert not result.indexed
    assert result.message.startswith("Sorry: Unit cell volume is too small")
