"""examples/demo.py: the options are checked up front (one-line errors, no hang), and a tiny run completes."""

from __future__ import annotations

import pytest
from examples.demo import main, parse_args


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # fewer images than one batch: drop_last left no batch and the loop never ended
        (["--images", "1"], "--batch-images must be <= --images (1), got 8"),
        (["--patch", "200"], "--patch must be in [16, --size (128)], got 200"),
        (["--patch", "8"], "--patch must be in [16, --size (128)], got 8"),  # too small for the encoder's 4 poolings
        (["--size", "8"], "--size must be >= 32 (the synthetic fundus images), got 8"),
        (["--device", "foo"], "--device must be a torch device (cpu, cuda, cuda:N, mps), got 'foo'"),
        (["--steps", "0"], "--steps must be >= 1, got 0"),
    ],
)
def test_bad_options_are_one_line_errors(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse_args(args)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_device_without_cuda_is_refused(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)  # as on a machine without CUDA
    with pytest.raises(SystemExit):
        parse_args(["--device", "cuda"])
    assert (
        "--device must be a device of this machine (CUDA is not available here), got 'cuda'" in capsys.readouterr().err
    )


def test_tiny_run_with_one_image(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--steps", "2", "--images", "1", "--batch-images", "1", "--size", "64", "--patch", "16"])
    out = capsys.readouterr().out
    assert "2 steps in" in out
    assert "lesion-healthy" in out
