"""The adatsq command line: inspect/export on builtins, folders and ONNX files; one-line errors
with exit code 2 and no partial output."""

import json
import os
import subprocess
import sys

import pytest

from adatsq.tools.cli import main


def run_cli_process(*args):
    """``python -m adatsq ARGS`` in a child process: the real entry point, its exit code and stderr."""
    return subprocess.run([sys.executable, "-m", "adatsq", *args], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200"})


def run_cli(*args):
    """``adatsq ARGS`` in this process (a child process costs ~10 s of imports on a 2-core CPU): the
    exit code main() returns or argparse exits with, and what went to stdout and stderr. An
    exception main() lets through is an exit code 1 with its traceback on stderr, as in a process."""
    import contextlib
    import io
    import traceback

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse
            code = exc.code if isinstance(exc.code, int) else 1
        except Exception:  # noqa: BLE001 - what a process would print before dying
            traceback.print_exc(file=err)
            code = 1
    return subprocess.CompletedProcess(["adatsq", *args], code, out.getvalue(), err.getvalue())


def test_inspect_builtin_writes_json(tmp_path, capsys):
    out = tmp_path / "out.json"
    assert main(["inspect", "tiny-flux", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["arch"] == "FluxTransformer2DModel" and len(data["layers"]) == 50
    roles = {r["role"]: r for r in data["totals"]}
    assert abs(sum(r["param_share"] for r in roles.values()) - 1) < 1e-9
    assert abs(sum(r["mac_share"] for r in roles.values()) - 1) < 1e-9
    assert roles["attn_q"]["layers"] == 6  # 2 double blocks x (to_q, add_q_proj) + 2 single blocks
    printed = capsys.readouterr().out
    assert "mlp_down" in printed and "50 quantizable layers" in printed


def test_export_then_inspect_onnx(tmp_path, capsys):
    onnx_path, table_json = tmp_path / "m.onnx", tmp_path / "t.json"
    assert main(["export", "tiny-wan", "-o", str(onnx_path), "--json", str(table_json)]) == 0
    capsys.readouterr()
    onnx_json = tmp_path / "from_onnx.json"
    assert main(["inspect", str(onnx_path), "--json", str(onnx_json)]) == 0
    a, b = json.loads(table_json.read_text()), json.loads(onnx_json.read_text())
    assert a["source"] == "torch.export" and b["source"] == "onnx"
    strip = lambda d: [{k: v for k, v in l.items() if k not in ("fx_nodes", "onnx_nodes", "calls")}
                       for l in d["layers"]]
    assert strip(a) == strip(b)
    assert a["totals"] == b["totals"]
    assert "WanTransformer3DModel (onnx)" in capsys.readouterr().out


def test_folder(tmp_path):
    from adatsq.frontend.architectures import BUILTINS

    BUILTINS["tiny-pixart"].tiny().save_pretrained(tmp_path / "pixart", safe_serialization=True)
    out = tmp_path / "pixart.json"
    assert main(["inspect", str(tmp_path / "pixart"), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["arch"] == "PixArtTransformer2DModel"


def _write(path, data):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("make_bad, needle", [
    (lambda d: d / "absent", "absent: no such file or folder"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "empty: no config.json"),
    (lambda d: _write(d / "trunc.onnx", b"\x08\x07\x12\x05junk-junk"), "trunc.onnx"),
])
def test_bad_input_one_line_exit_2(tmp_path, make_bad, needle):
    target = make_bad(tmp_path)
    out = tmp_path / "never.json"
    r = run_cli_process("inspect", str(target), "--json", str(out))
    assert r.returncode == 2, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("adatsq: error:") and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]


def test_bad_resolution_and_arch(tmp_path):
    r = run_cli("inspect", "tiny-sd3", "--height", "15")
    assert r.returncode == 2 and "latent height 15 is not a multiple of the patch size 2" in r.stderr
    folder = tmp_path / "unet"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    r = run_cli("inspect", str(folder))
    assert r.returncode == 2 and "unsupported architecture 'UNet2DConditionModel'" in r.stderr


def test_export_failure_leaves_no_file(tmp_path):
    out = tmp_path / "m.onnx"
    r = run_cli("export", "tiny-flux", "-o", str(out), "--opset", "17")
    assert r.returncode == 2 and "opset 17 is too old" in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_plan_check_through_cli(tmp_path, capsys):
    plan = tmp_path / "plan.json"
    assert main(["plan", "tiny-dit", "-o", str(plan), "--steps", "3", "--precision", "W4A8"]) == 0
    data = json.loads(plan.read_text())
    assert data["achieved"] == {"w_bits": 4.0, "a_bits": 8.0} and len(data["assignment"]) == 3
    assert main(["inspect", "tiny-dit", "--plan", str(plan)]) == 0
    onnx_path = tmp_path / "dit.onnx"
    assert main(["export", "tiny-dit", "-o", str(onnx_path)]) == 0
    assert main(["inspect", str(onnx_path), "--plan", str(plan)]) == 0  # fingerprint travels in the ONNX
    capsys.readouterr()
    r = run_cli("inspect", "tiny-dit", "--seed", "1", "--plan", str(plan))  # same config, other weights
    assert r.returncode == 2 and "plan.json: made for another model" in r.stderr and "weights differ" in r.stderr
    r = run_cli("inspect", "tiny-flux", "--plan", str(plan))
    assert r.returncode == 2 and "architecture differ" in r.stderr
    r = run_cli("plan", "tiny-dit", "-o", str(tmp_path / "bad.json"), "--precision", "W5A5")
    assert r.returncode == 2 and "'W5A5' not in the lattice" in r.stderr
    assert not (tmp_path / "bad.json").exists()


def test_analyze_then_inspect(tmp_path, capsys):
    """A small analysis of flux-fmnist through the CLI; then `inspect --analysis` shows it again."""
    out, cache = tmp_path / "an", tmp_path / "cache"
    args = ["analyze", "flux-fmnist", "-o", str(out), "--cache", str(cache), "--steps", "2", "--classes", "0,1",
            "--seeds-per-class", "1", "--samples", "2", "--precisions", "W4A4", "--e2e-steps", "2",
            "--e2e-per-step", "1"]
    assert main(args) == 0
    summary = json.loads((out / "analysis.json").read_text())
    assert summary["format"] == "adatsq.analysis" and len(summary["fisher"]["total_weight"]) == 2
    assert summary["sensitivity"]["precisions"] == ["W4A4"]
    for name in ("fisher.png", "sensitivity.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / name).stat().st_size > 10_000, name
    assert "| step | I[t] share |" in (out / "analysis.md").read_text()
    assert "I[t] max/min" in capsys.readouterr().out
    # a rerun is served from the cache and gives the same JSON
    first = (out / "analysis.json").read_text()
    assert main(args) == 0
    assert "'trajectory': 0, 'fisher': 0" in (out / "analysis.md").read_text()
    assert (out / "analysis.json").read_text() == first
    (out / "fisher.png").unlink()
    assert main(["inspect", "flux-fmnist", "--analysis", str(out)]) == 0
    assert (out / "fisher.png").is_file()
    assert "temporal Fisher" in capsys.readouterr().out


def test_analyze_errors(tmp_path):
    r = run_cli("analyze", "tiny-flux", "-o", str(tmp_path / "x"))
    assert r.returncode == 2 and "calibration set" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("analyze", "flux-fmnist", "-o", str(tmp_path / "x"), "--precisions", "W5A5")
    assert r.returncode == 2 and "W5A5" in r.stderr
    bad = tmp_path / "analysis.json"
    bad.write_text("{not json")
    r = run_cli("inspect", "tiny-flux", "--analysis", str(bad))
    assert r.returncode == 2 and "not valid JSON" in r.stderr
    assert not (tmp_path / "x").exists()


def test_eval_method_and_bits_flags(tmp_path):
    r = run_cli("eval", "--method", "gptq", "-n", "4")
    assert r.returncode == 2 and "--method and --bits go together" in r.stderr
    r = run_cli("eval", "--method", "awq", "--bits", "W4A4", "-n", "4")
    assert r.returncode == 2 and "unknown variant 'w4a4-awq'" in r.stderr


def test_quantize_errors(tmp_path):
    out = tmp_path / "w.safetensors"
    for args, msg in ((("--bits", "16"), "integer weight width 2..8"), (("--bits", "4", "--group", "0"), "positive"),
                      (("--bits", "4", "--damp", "0"), "damping"), (("--bits", "4", "--layers", "("), "regular expression")):
        r = run_cli("quantize", "flux-fmnist", "-o", str(out), *args)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    r = run_cli("quantize", "tiny-flux", "-o", str(out), "--bits", "4")
    assert r.returncode == 2 and "not a reference model" in r.stderr
    assert not out.exists()


def test_build_errors(tmp_path):
    out = tmp_path / "b"
    for args, msg in ((("--budget", "four"), "expected W<bits>A<bits>"), (("--target", "tpu"), "unknown target 'tpu'"),
                      (("--budget", "W2A2"), "infeasible budget W2A2"), (("--beam", "0"), "must be >= 1"),
                      (("--rank", "-1"), "rank and group size must be >= 0")):
        r = run_cli("build", "flux-fmnist", "-o", str(out), *args)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    r = run_cli("build", "tiny-flux", "-o", str(out))
    assert r.returncode == 2 and "not a reference model" in r.stderr
    r = run_cli("eval", "-n", "4", "--plan", str(out))
    assert r.returncode == 2 and "not a build directory" in r.stderr
    r = run_cli("eval", "-n", "4", "--device", "tpu")
    assert r.returncode == 2 and "device 'tpu'" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


def test_stage_progress_prints_quarter_lines_where_no_bar_is_drawn(monkeypatch):
    """Long stages (eval, build, analyze, quantize) report progress in logs too: without a terminal a
    line at each stage's first step and at each further quarter; a terminal gets the bar alone."""
    import io

    from rich.console import Console
    from rich.progress import Progress

    from adatsq.tools import cli

    for terminal in (False, True):
        buf = io.StringIO()
        monkeypatch.setattr(cli, "console", Console(file=buf, force_terminal=terminal, width=100))
        with Progress(console=cli.console, auto_refresh=False) as progress:
            on_progress = cli.stage_progress(progress, lambda stage: f"sampling {stage}")
            for done in range(1, 9):
                on_progress("fp", done, 8)
        lines = [ln.split(" ", 1)[1] for ln in buf.getvalue().splitlines() if ln[:2].isdigit() and ln[2:3] == ":"]
        assert lines == ([] if terminal else [f"sampling fp: {d}/8" for d in (1, 2, 4, 6, 8)]), lines
