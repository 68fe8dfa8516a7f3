"""evaluation/dials_commands.py: DIALS' reason for a failure, read from its output."""
from __future__ import annotations

from peaknet_xtal.evaluation.dials_commands import dials_reason

#: The end of a failed run with a user error ("Sorry: ...", as DIALS prints one) that runs over
#: two lines (an example made for this test, not DIALS' words).
WRAPPED_SORRY = """\
Found max_cell: 169.5 Angstrom
Setting d_min: 3.40
Sorry: the first line of a user error that DIALS wraps, and to get past it
set some_option=True.
"""


def test_the_reason_is_dials_whole_last_words_not_their_last_line():
    """The last line alone was a fragment ("set some_option=True.") that said nothing."""
    reason = dials_reason(WRAPPED_SORRY)
    assert reason.startswith("Sorry: the first line of a user error")
    assert reason.endswith("set some_option=True.")


def test_an_exception_is_a_reason_and_the_last_one_wins():
    text = ("Sorry: an earlier complaint\nmore output\nTraceback (most recent call last):\n"
            '  File "x.py", line 1\nRuntimeError: No suitable lattice could be found.\n')
    assert dials_reason(text) == "RuntimeError: No suitable lattice could be found."


#: dials.index stopping with sys.exit(message) on an indexing error (DIALS 3.12's words)
VOLUME_INCREASE = """Unrealistic unit cell volume increase during refinement of 74.3%.
Please try refining fewer parameters, either by enforcing symmetry
constraints (space_group=) and/or disabling experimental geometry
refinement (detector.fix=all and beam.fix=all). To disable this
sanity check set disable_unit_cell_volume_sanity_check=True.
"""


def test_a_message_dials_exits_with_is_read_whole_from_stderr():
    """dials.index ends an indexing error with sys.exit(message): no "Sorry:" to find, and the
    output's last line was all peaknet-eval reported."""
    output = "Refining ...\n#refl 120\n" + VOLUME_INCREASE
    reason = dials_reason(output, "some warning\n\n" + VOLUME_INCREASE)
    assert reason.startswith("Unrealistic unit cell volume increase during refinement of 74.3%.")
    assert "some warning" not in reason and len(reason) == 200


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
                                               + VOLUME_INCREASE, VOLUME_INCREASE)

    monkeypatch.setattr(dials_commands, "run_dials", failing)
    result = index_strong(tmp_path, [], env={})
    assert not result.indexed
    assert result.message.startswith("Unrealistic unit cell volume increase")
