"""tools/search_table.py: labels from build reports, merged eval JSONs, clear errors."""

import json

from adatsq.tools import search_table


def _eval(variants, samples=1000):
    return dict(format="adatsq.eval", model="flux-fmnist", model_fingerprint="abc", samples=samples, seed=0,
                schedule=dict(num_steps=20, guidance=2.0), environment=dict(device="cpu"), variants=variants)


def _row(w, a, acc, fid, psnr=None):
    return dict(w_bits=w, a_bits=a, judge_accuracy=acc, fid=fid, psnr_vs_fp=psnr, ssim_vs_fp=None if psnr is None else 0.9)


def test_table_labels_plans_by_their_report_and_merges_jsons(tmp_path):
    builds = tmp_path / "copies"
    for name, opts in (("w4a4", {}), ("w4a4-per-step", dict(policy="per-step"))):
        (builds / name).mkdir(parents=True)
        o = dict(search_table.DEFAULTS, **opts)
        (builds / name / "report.json").write_text(json.dumps(dict(
            options=o, budget=dict(w_bits=4.0, a_bits=4.0), search=dict(final_error=1e-3), memory=dict(ratio_to_fp16=0.5))))
    a = tmp_path / "a.json"
    b = tmp_path / "b.json"
    a.write_text(json.dumps(_eval({"fp": _row(16, 16, 0.98, 2.3), "w4a4-svdquant": _row(4, 4, 0.97, 2.0, 33.0),
                                   "w3a3-rtn": dict(w_bits=3.0, a_bits=3.0, error="boom")})))
    b.write_text(json.dumps(_eval({"fp": _row(16, 16, 0.5, 9.9), "plan:gone/w4a4": _row(3.9, 3.9, 0.99, 1.7, 34.0),
                                   "plan:gone/w4a4-per-step": _row(3.8, 3.8, 0.98, 1.8, 33.5)})))
    assert search_table.main([str(a), str(b), "--out", str(tmp_path / "t"), "--builds", str(builds)]) == 0
    md = (tmp_path / "t.md").read_text()
    assert "FP: judge accuracy 0.980" in md  # the first file's FP row is kept
    assert "| **AdaTSQ (ours)** | 3.90 | 3.90 | 0.990 | 1.70 | 34.00 |" in md
    assert "ablation: per-step only" in md and "SVDQuant-like (ours)" in md
    assert "w3a3-rtn" not in md and "### average W3A3" not in md  # a failed variant is left out
    assert (tmp_path / "t.png").stat().st_size > 1000
    bad = tmp_path / "c.json"
    bad.write_text(json.dumps(_eval({"fp": _row(16, 16, 0.98, 2.3)}, samples=64)))
    assert search_table.main([str(a), str(bad), "--out", str(tmp_path / "u")]) == 2
    assert not (tmp_path / "u.md").exists()
    (tmp_path / "d.json").write_text("[1, 2]")
    assert search_table.main([str(tmp_path / "d.json"), "--out", str(tmp_path / "v")]) == 2


def test_builds_from_before_an_option_existed_are_labelled_by_what_they_did(tmp_path):
    legacy = {k: v for k, v in search_table.DEFAULTS.items() if k not in search_table.LEGACY}
    assert search_table.build_label(dict(options=legacy), "plan:x") == (
        "ablation: no uniform anchor, scored on calibration samples", False)
    assert search_table.build_label(dict(options=dict(search_table.DEFAULTS)), "plan:x") == ("AdaTSQ (ours)", True)
    mixed = dict(search_table.DEFAULTS, fisher_mix=0.5)
    assert search_table.build_label(dict(options=mixed), "plan:x")[0] == "ablation: Fisher mix 0.5"
    a = tmp_path / "a.json"
    a.write_text(json.dumps(_eval({"fp": _row(16, 16, 0.98, 2.3), "w4a4-svdquant": _row(4, 4, 0.97, 2.0, 33.0),
                                   "w4a4-rtn": _row(4, 4, 0.9, 6.0, 21.0)})))
    assert search_table.main([str(a), "--out", str(tmp_path / "t"), "--exclude", "w4a4-rtn"]) == 0
    assert "RTN" not in (tmp_path / "t.md").read_text()
    assert search_table.main([str(a), "--out", str(tmp_path / "u"), "--exclude", "w4a4-nope"]) == 2
