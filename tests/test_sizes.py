"""mdit-sizes: the tables of every preset, the original DiT's among them."""

from __future__ import annotations

from diffusers_mdit.cli import dit_table, preset_table, sizes


def test_the_dit_table_lists_the_papers_sizes_with_both_parameter_counts():
    rows = dit_table().splitlines()
    assert [row.split()[0] for row in rows[1:]] == ["DiT-S/2", "DiT-B/2", "DiT-L/2", "DiT-XL/2"]
    name, params, paper_count, gmacs, *paper = rows[2].split()
    assert (params, paper_count, gmacs) == ("147.4M", "130.3M", "23.01")
    assert "130M; 23.01 G" in " ".join(paper)


def test_the_mdit_table_names_the_analogs_and_the_old_names_still_work(capsys):
    names = [row.split()[0] for row in preset_table(16, 16).splitlines()[1:]]
    assert "MDiT-analog-B" in names and "DiT-B" not in names
    assert sizes(["--preset", "DiT-S", "--resolution", "16", "--no_table"]) == 0
    assert "widths 128/256" in capsys.readouterr().out
