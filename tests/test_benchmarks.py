"""`python -m benchmarks --only NAME` refreshes NAME's results in RESULTS.md and keeps everything else."""

from __future__ import annotations

from benchmarks.__main__ import BEGIN, END, write_sections


def test_a_partial_run_replaces_only_its_own_results_and_keeps_the_hand_written_text(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmarks\n\nHand-written findings.\n")

    write_sections({"overhead": "### overhead\n\nfirst run", "train": "### train\n\nzoo 70 s"}, results)
    write_sections({"overhead": "### overhead\n\nsecond run"}, results)

    text = results.read_text()
    assert text.startswith("# Benchmarks\n\nHand-written findings.\n")
    assert text.count(BEGIN) == 1 and text.count(END) == 1
    generated = text[text.index(BEGIN):]
    assert "second run" in generated and "first run" not in generated
    assert "zoo 70 s" in generated
    assert generated.index("### train") < generated.index("### overhead")  # the benchmarks' order, not the runs'
