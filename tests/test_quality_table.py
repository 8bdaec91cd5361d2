"""The quality-table script's layout: every method x bit-width cell, peers with their errors."""

from adatsq.tools.quality_table import markdown, plot, variants


def _result():
    row = lambda acc, fid, psnr, ssim: dict(w_bits=4.0, a_bits=4.0, judge_accuracy=acc, fid=fid, psnr_vs_fp=psnr,
                                           ssim_vs_fp=ssim, feature_distance_vs_fp=0.1, per_class_accuracy={})
    v = {"fp": dict(row(0.97, 8.0, None, None), w_bits=16.0, a_bits=16.0),
         "w4a4-rtn": row(0.9, 12.0, 20.5, 0.71), "w8a8-rtn": row(0.97, 8.1, 47.0, 0.998),
         "w4a4-svdquant": row(0.96, 8.2, 33.2, 0.98),
         "torchao-int8-dyn": dict(row(0.97, 8.2, 48.1, 0.99), w_bits=8.0, a_bits=8.0),
         "modelopt-int8-sq": dict(w_bits=8.0, a_bits=8.0, error="peer modelopt-int8-sq: cannot import modelopt\nmore")}
    return dict(model="flux-fmnist", samples=64, seed=0, classes=list("abcdefghij"),
                schedule=dict(num_steps=20, guidance=2.0), variants=v,
                environment=dict(cpu="AMD EPYC", threads=2, torch="2.13.0+cpu"))


def test_variants_cover_every_pair():
    assert variants(["rtn", "gptq"], ["W8A8", "W4A4"], ["torchao-int8-dyn"]) == [
        "w8a8-rtn", "w4a4-rtn", "w8a8-gptq", "w4a4-gptq", "torchao-int8-dyn"]


def test_markdown_pivots_metrics_and_reports_peer_errors(tmp_path):
    md = markdown(_result(), ["rtn", "svdquant"], ["W8A8", "W4A4"], ["torchao-int8-dyn", "modelopt-int8-sq"],
                  {"fp": 30.0, "w4a4-rtn": 40.0}, 125.0)
    assert "| RTN | 47.00 | 20.50 |" in md  # PSNR row: W8A8 then W4A4
    assert "| SVDQuant-like (ours) | — | 33.20 |" in md  # a pair not run shows a dash
    assert "| torchao-int8-dyn | 8 | 8 | 0.970 | 8.20 | 48.10 | 0.9900 |" in md
    assert "did not run: peer modelopt-int8-sq: cannot import modelopt more" in md
    assert "Whole table: 2.1 min on AMD EPYC" in md
    plot(_result(), ["rtn", "svdquant"], ["W8A8", "W4A4"], tmp_path / "t.png")
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
