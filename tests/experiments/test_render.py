"""``render``: the generated source, readable without the hardware."""

from __future__ import annotations

import pytest

from experiments.cli import main


def test_cpu_source_goes_to_stdout(capsys):
    assert main(["render", "--op", "matmul", "--shape", "32x48x16"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("// matmul 32x48x16, schedule expert") and "void matmul_32_48_16(" in out


def test_cuda_source_without_a_gpu_names_its_launch(capsys):
    assert main(["render", "--op", "conv2d", "--shape", "1,8,14,14,16,3,3,1,1", "--target", "cuda"]) == 0
    out = capsys.readouterr().out
    assert "// launch: grid (" in out and "__global__" in out


def test_out_writes_the_source_alone(capsys, tmp_path):
    out = tmp_path / "k.cu"
    assert main(["render", "--op", "matmul", "--shape", "64x64x64", "--target", "cuda", "--schedule", "naive",
                 "--out", str(out)]) == 0
    text = out.read_text()
    assert text.lstrip().startswith("#ifndef") and "schedule naive" not in text
    assert "written to" in capsys.readouterr().err


@pytest.mark.parametrize("args, why", [(["--op", "matmul", "--shape", "8x8"], "has 2 numbers"),
                                       (["--op", "matmul", "--shape", "8x8x8", "--schedule", "nope.json"],
                                        "neither naive, expert nor a file")])
def test_bad_input_is_one_error_line(capsys, args, why):
    assert main(["render", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and why in err[0]
