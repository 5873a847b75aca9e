"""Tests of the helpers every benchmark shares."""

from __future__ import annotations

from bench import common


def test_markdown_table_aligns_columns():
    table = common.markdown_table(["rank", "accuracy"], [[1, "0.500"], [2, "0.750"]])

    assert table == "| rank | accuracy |\n| :--- | ---: |\n| 1 | 0.500 |\n| 2 | 0.750 |"


def test_round_order_alternates_direction():
    assert common.round_order(["a", "b", "c"], 0) == ["a", "b", "c"]
    assert common.round_order(["a", "b", "c"], 1) == ["c", "b", "a"]
    assert common.round_order(["a", "b", "c"], 2) == ["a", "b", "c"]


def test_fill_sections_replaces_only_rendered_names():
    text = (
        "intro\n<!-- bench:quality -->\nold\n<!-- /bench:quality -->\n<!-- bench:other -->\nkeep\n<!-- /bench:other -->"
    )

    filled = common.fill_sections(text, {"quality": "| new |"})

    assert filled == (
        "intro\n<!-- bench:quality -->\n| new |\n<!-- /bench:quality -->\n<!-- bench:other -->\nkeep\n<!-- /bench:other -->"
    )


def test_fmt_marks_missing_values():
    assert common.fmt(None) == "-"
    assert common.fmt(0.12345) == "0.123"
    assert common.fmt(0.12345, 1) == "0.1"
