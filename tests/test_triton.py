"""The Triton path of the fused loss (mlcl_losses._triton).

Without a GPU the kernels run in Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``, in a
subprocess: tests/triton_cases.py), and are checked there against the float64 reference: loss,
gradients, statistics, and the per-level log-sum-exp, negative counts and cosine sums against
dense masks. On a CUDA machine the compiled kernels are checked through the public function.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from mlcl_losses import Level, ViewTags, _triton, comcl_levels
from mlcl_losses.functional import multilevel_info_nce

pytest.importorskip("triton")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from triton_cases import CASES  # noqa: E402


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    out = tmp_path_factory.mktemp("triton") / "cases.pt"
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(HERE / "triton_cases.py"), str(out)], env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-4000:]
    saved = torch.load(out, weights_only=False)
    return {**{r["name"]: r for r in saved["cases"]}, "_extra": saved["extra"]}


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_interpreted_kernels_equal_the_reference(interpreted: dict[str, dict[str, Any]], name: str) -> None:
    r = interpreted[name]
    assert r["out"] == pytest.approx(r["ref"], rel=1e-5, abs=1e-6)
    torch.testing.assert_close(r["grad"], r["ref_grad"], rtol=1e-4, atol=1e-6)
    assert r["out_stats"].keys() == r["ref_stats"].keys()
    for level, got in r["out_stats"].items():
        want = r["ref_stats"][level]
        assert got[1:3] == want[1:3]  # contributing and skipped anchors
        assert torch.equal(got[5], want[5])  # which anchors contributed
        assert got[0] == pytest.approx(want[0], rel=1e-5, abs=1e-6)
        assert got[3:5] == pytest.approx(want[3:5], rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_interpreted_lse_counts_and_cosines_match_dense_masks(
    interpreted: dict[str, dict[str, Any]], name: str
) -> None:
    r = interpreted[name]
    for li, (lse, count, cos_sum) in enumerate(r["dense"]):
        torch.testing.assert_close(r["lse"][li], lse, rtol=1e-5, atol=1e-5)
        assert torch.equal(r["count"][li], count)
        torch.testing.assert_close(r["cos_sum"][li], cos_sum, rtol=1e-5, atol=1e-4)


def test_interpreted_kernels_read_strided_tags(interpreted: dict[str, dict[str, Any]]) -> None:
    lse_view, count_view, lse_copy, count_copy = interpreted["_extra"]["strided"]
    assert torch.equal(count_view, count_copy)
    torch.testing.assert_close(lse_view, lse_copy)


def test_interpreted_half_input_gets_a_half_gradient(interpreted: dict[str, dict[str, Any]]) -> None:
    dtype, grad_half, grad_float = interpreted["_extra"]["half"]
    assert dtype == torch.float16
    torch.testing.assert_close(grad_half, grad_float, rtol=1e-2, atol=1e-3)


def test_supports_only_what_the_kernels_compute(monkeypatch: pytest.MonkeyPatch) -> None:
    tags = ViewTags(kind=[1, 1, 0, 0], quality=[0, 1, 0, 1], source=[0, 0, 1, 1], label=[0, 0, 1, 1])
    z = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    levels = comcl_levels()
    none = [None] * len(levels)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not _triton.supports(z, tags, levels, None, none, none)  # CPU without the interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _triton.supports(z, tags, levels, None, none, none)
    assert not _triton.supports(z.double(), tags, levels, None, none, none)
    wide = torch.nn.functional.normalize(torch.randn(4, _triton.MAX_DIM + 1), dim=1)
    assert not _triton.supports(wide, tags, levels, None, none, none)  # rows would not fit in shared memory
    assert not _triton.supports(z, tags, levels, z, none, none)  # bank
    assert not _triton.supports(z, tags, levels, None, [torch.zeros(4, 1, dtype=torch.long)] + none[1:], none)
    assert not _triton.supports(z, tags, levels, None, none, [torch.ones(4, 4)] + none[1:])
    assert not _triton.supports(z, tags, [Level.supervised()], None, [None], [None])  # label positives: dense
    assert not _triton.supports(z, tags, [Level.instance(name=str(i)) for i in range(9)], None, [None] * 9, [None] * 9)
    assert not _triton.supports(z, tags, levels, None, none, none, tau_plus=0.1)
    assert not _triton.supports(z, tags, levels, None, none, none, beta=0.5)
    assert not _triton.supports(z, tags, levels, None, none, none, pair_mask=(None, None))


def test_backend_triton_refuses_what_it_cannot_compute(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    tags = ViewTags(kind=[1, 1, 0, 0], quality=[0, 1, 0, 1], source=[0, 0, 1, 1])
    with pytest.raises(ValueError, match="backend='triton'"):
        multilevel_info_nce(torch.randn(4, 8), tags, comcl_levels(), impl="fused", backend="triton")


def test_cpu_calls_never_dispatch_to_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # even where the interpreter could run them

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the Triton path ran on CPU")

    monkeypatch.setattr(_triton, "multilevel_info_nce_triton", fail)
    tags = ViewTags(kind=[1, 1, 0, 0], quality=[0, 1, 0, 1], source=[0, 0, 1, 1])
    multilevel_info_nce(torch.randn(4, 8), tags, comcl_levels(), impl="fused")


@pytest.mark.cuda
@pytest.mark.parametrize("denominator", ["pos_neg", "all"])
def test_cuda_fused_path_runs_the_triton_kernels(monkeypatch: pytest.MonkeyPatch, denominator: str) -> None:
    calls = []
    original = _triton.multilevel_info_nce_triton

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(_triton, "multilevel_info_nce_triton", spy)
    g = torch.Generator().manual_seed(0)
    n, d = 1000, 128
    source = torch.randint(0, 300, (n,), generator=g)
    tags = ViewTags(
        kind=torch.randint(0, 2, (n,), generator=g),
        quality=torch.randint(0, 2, (n,), generator=g),
        source=source,
        image=source // 2,
    ).to("cuda")
    x = torch.randn(n, d, generator=g, dtype=torch.float64).cuda()
    x64 = x.clone().requires_grad_()
    ref, ref_stats = multilevel_info_nce(x64, tags, comcl_levels(), 0.1, denominator, impl="reference")
    (ref_grad,) = torch.autograd.grad(ref, x64)
    x32 = x.float().requires_grad_()
    out, stats = multilevel_info_nce(x32, tags, comcl_levels(), 0.1, denominator, impl="fused")
    (grad,) = torch.autograd.grad(out, x32)
    assert calls, "impl='fused' on CUDA did not take the Triton path"
    assert float(out) == pytest.approx(float(ref), rel=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)
    for name, s in stats.items():
        assert torch.equal(s.valid, ref_stats[name].valid)
