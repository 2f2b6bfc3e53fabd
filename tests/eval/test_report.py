from awqkit.eval.report import format_table, plot_report

REPORT = {
    "config": {"mode": "stream", "seq_len": 512, "max_windows": 16, "n_samples": 0, "seed": 42},
    "models": [
        {"name": "base", "dtype": "bfloat16", "saved_dtype": "bfloat16"},
        {"name": "q4", "dtype": "float32", "saved_dtype": "bfloat16"},
    ],
    "datasets": {
        "fortunes": {
            "bos": False,
            "windows": 16,
            "tokens": 8176,
            "results": [
                {"ppl": 19.5, "ppl_ci": [18.0, 21.0]},
                {
                    "ppl": 21.25,
                    "ppl_ci": [19.5, 23.0],
                    "vs_first": {"mean_nll_diff": 0.0859, "ci": [0.05, 0.12], "win_share": 0.0625},
                },
            ],
        }
    },
}


def test_the_table_has_a_row_per_model_with_the_paired_difference_to_the_first():
    lines = format_table(REPORT).splitlines()
    assert lines[0].startswith("mode stream, seq-len 512, first 16 windows;")
    header, _, first, second = lines[2:]
    assert [c.strip() for c in header.strip("|").split("|")][:3] == ["dataset", "bos", "windows"]
    assert "| fortunes " in first and "#1 base" in first and "19.500" in first and "18.000 - 21.000" in first
    assert "#2 q4" in second and "float32 (saved bfloat16)" in second
    assert "+0.0859" in second and "[+0.0500, +0.1200]" in second and "6.2%" in second
    assert second.startswith("|          |")  # the dataset's cells only on its first row


def test_the_plot_is_a_png(tmp_path):
    plot_report(REPORT, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes().startswith(b"\x89PNG")
