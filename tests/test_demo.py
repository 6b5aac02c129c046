"""The demo: a tiny --quick run end to end, its outputs, and its option errors."""
from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch

from trak_fast.eval import demo

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_out")
    code = demo.main(["--quick", "--out", str(out), "--targets", "3", "--top", "4"])
    return code, out


def test_quick_demo_writes_finite_scores_of_the_right_shape(quick_run):
    code, out = quick_run
    assert code == 0
    scores = np.load(out / "scores.npy")
    assert scores.shape == (300, 100)          # --quick: 300 training images, 100 held-out targets
    assert np.isfinite(scores).all()
    assert np.abs(scores).max() > 0


def test_quick_demo_table_lists_the_extreme_scores(quick_run):
    _, out = quick_run
    summary = json.loads((out / "summary.json").read_text())
    scores = np.load(out / "scores.npy")
    assert summary["scores_shape"] == [300, 100] and len(summary["table"]) == 3
    labels = [row["label"] for row in summary["table"]]
    assert len(set(labels)) == 3                # targets with distinct digits
    for row in summary["table"]:
        column = scores[:, row["target"]]
        pro = [e["score"] for e in row["proponents"]]
        opp = [e["score"] for e in row["opponents"]]
        assert pro == pytest.approx(sorted(column)[::-1][:4], rel=1e-5)
        assert opp == pytest.approx(sorted(column)[:4], rel=1e-5)
    assert set(summary["stage_seconds"]) >= {"load data", "TRAK", "LDS check"}
    lds = summary["lds"]
    assert -1.0 <= lds["ci_low"] <= lds["lds"] <= lds["ci_high"] <= 1.0
    # Real --quick runs score LDS 0.8-0.86 (seeds 0-2); scores of pure noise score ~0.
    assert lds["ci_low"] > 0.3


def test_quick_demo_picture_is_a_valid_png(quick_run):
    _, out = quick_run
    data = (out / "attributions.png").read_bytes()
    assert data[:8] == PNG_SIGNATURE
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    width, height = struct.unpack(">II", data[16:24])
    assert zlib.crc32(data[12:29]) == struct.unpack(">I", data[29:33])[0]   # the IHDR chunk's own checksum
    assert width > 600 and height > 300        # 3 rows of 1 + 2 x 4 upscaled images
    plt_image = pytest.importorskip("matplotlib.image")
    pixels = plt_image.imread(out / "attributions.png")
    assert pixels.shape[:2] == (height, width) and pixels.std() > 0.05


def test_draw_without_matplotlib_says_how_to_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)    # makes `import matplotlib` raise ImportError
    row = {"target": 0, "label": 1, "predicted": 1,
           "proponents": [{"index": 0, "label": 1, "score": 1.0}], "opponents": [{"index": 1, "label": 2, "score": -1.0}]}
    x = torch.rand(2, 64)
    assert demo.draw([row], x, x, tmp_path / "a.png") is False
    assert "pip install matplotlib" in capsys.readouterr().out
    assert not (tmp_path / "a.png").exists()


@pytest.mark.parametrize("argv, message", [
    (["--models", "0"], "--models must be >= 1, got 0"),
    (["--models", "two"], "--models must be a positive integer, got 'two'"),
    (["--device", "tpu"], "'tpu'"),
    (["--device", "banana"], "unknown device 'banana'"),
    (["--proj-dim", "-5"], "--proj-dim must be >= 1"),
    (["--kind", "dense"], "invalid choice: 'dense'"),
    (["--lds-subsets", "1"], "--lds-subsets: must be 0 (skip) or >= 2"),
])
def test_bad_options_are_clear_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        demo.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        demo.main(["--device", "cuda"])
    assert "CUDA is not available" in capsys.readouterr().err


def test_help_through_the_module_entry_point_lists_the_options():
    run = subprocess.run([sys.executable, "-m", "trak_fast", "demo", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    for option in ("--models", "--proj-dim", "--kind", "--device", "--out", "--quick"):
        assert option in run.stdout
    assert "python -m trak_fast demo" in run.stdout
