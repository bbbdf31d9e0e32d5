"""Tests of mlcl_losses.loss.MultiLevelContrastiveLoss (the index itself is tested in tests/index/)."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import mlcl_losses
from mlcl_losses import loss as loss_module
from mlcl_losses.functional import multilevel_info_nce
from mlcl_losses.index import faiss_available
from mlcl_losses.levels import Level, comcl_levels, level_masks
from mlcl_losses.loss import MultiLevelContrastiveLoss
from mlcl_losses.self_paced import PaceSchedule, SelfPacedWeighting
from mlcl_losses.tags import ViewTags

TOL64 = {"rtol": 1e-10, "atol": 1e-10}
IMPLS = [pytest.param("reference", id="reference"), pytest.param("auto", id="auto")]


def batch(device: torch.device, seed: int = 0, boxes: int = 3) -> tuple[torch.Tensor, ViewTags]:
    """``boxes`` lesion boxes (V1a, V1b, V2) and as many healthy patches (V3, V4), one image each."""
    kind, quality, source = [], [], []
    for b in range(boxes):
        kind += [1, 1, 1, 0, 0]
        quality += [0, 0, 1, 0, 1]
        source += [2 * b, 2 * b, 2 * b, 2 * b + 1, 2 * b + 1]
    tags = ViewTags(kind=kind, quality=quality, source=source, image=[s // 2 for s in source]).to(device)
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(len(tags), 8, generator=gen, dtype=torch.float64).to(device)
    return z, tags


def grads(loss: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(loss, x)
    return g


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "options",
    [
        pytest.param({}, id="defaults"),
        pytest.param({"denominator": "all", "temperature": 0.5}, id="all"),
        pytest.param({"tau_plus": 0.1, "beta": 0.5}, id="hcl"),
        pytest.param({"levels": [Level.instance()], "temperature": 0.2}, id="instance"),
    ],
)
def test_equals_function(options: dict[str, Any], impl: str, device: torch.device) -> None:
    z, tags = batch(device)
    z.requires_grad_(True)
    criterion = MultiLevelContrastiveLoss(**options, impl=impl)
    loss, stats = criterion(z, tags)
    fn_options = {k: v for k, v in options.items() if k != "levels"}
    expected, expected_stats = multilevel_info_nce(
        z, tags, options.get("levels", comcl_levels()), **fn_options, impl="reference"
    )
    torch.testing.assert_close(loss, expected, **TOL64)
    torch.testing.assert_close(grads(loss, z), grads(expected, z), **TOL64)
    assert list(stats) == list(expected_stats)
    for name, s in stats.items():
        assert int(s.anchors) == int(expected_stats[name].anchors)
        torch.testing.assert_close(s.loss, expected_stats[name].loss, **TOL64)


def test_default_levels_are_comcl() -> None:
    criterion = MultiLevelContrastiveLoss()
    assert criterion.levels == comcl_levels()
    assert "lesion" in repr(criterion)
    assert "temperature=0.1" in repr(criterion)


def _weights_by_hand(
    z: torch.Tensor, tags: ViewTags, levels: list[Level], spl: SelfPacedWeighting
) -> list[torch.Tensor]:
    zn = torch.nn.functional.normalize(z.detach(), dim=1)
    cos = zn @ zn.T
    return [spl(cos, m.negatives) for m in level_masks(tags, levels)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    ("regularizer", "schedule"),
    [
        pytest.param("linear", PaceSchedule.constant(0.3), id="linear"),
        pytest.param("hard", PaceSchedule.linear(0.1, 0.9, 4), id="hard-ramp"),
        pytest.param("mixture", PaceSchedule.exponential(0.1, 1.0, 3), id="mixture"),
        pytest.param("hard", PaceSchedule.quantile(0.5, 1.0, 4), id="quantile"),
    ],
)
def test_negative_weighting_equals_weights_by_hand(
    regularizer: str, schedule: PaceSchedule, impl: str, device: torch.device
) -> None:
    z, tags = batch(device, seed=1)
    z.requires_grad_(True)
    spl = SelfPacedWeighting(regularizer, schedule, target="negatives")  # type: ignore[arg-type]
    criterion = MultiLevelContrastiveLoss(weighting=spl, impl=impl)
    levels = comcl_levels()
    for _ in range(3):  # also after the pace moved
        loss, _ = criterion(z, tags)
        expected, _ = multilevel_info_nce(z, tags, levels, negative_weights=_weights_by_hand(z, tags, levels, spl))
        torch.testing.assert_close(loss, expected, **TOL64)
        torch.testing.assert_close(grads(loss, z), grads(expected, z), **TOL64)
        criterion.step()


def test_weighting_mapping_weights_only_named_levels(device: torch.device) -> None:
    z, tags = batch(device, seed=2)
    spl = SelfPacedWeighting("hard", PaceSchedule.constant(0.2))
    criterion = MultiLevelContrastiveLoss(weighting={"healthy": spl})
    loss, _ = criterion(z, tags)
    levels = comcl_levels()
    by_hand = _weights_by_hand(z, tags, levels, spl)
    expected, _ = multilevel_info_nce(z, tags, levels, negative_weights=[None, None, by_hand[2]])
    torch.testing.assert_close(loss, expected, **TOL64)
    unweighted, _ = multilevel_info_nce(z, tags, levels)
    assert not torch.allclose(loss, unweighted)


@pytest.mark.parametrize(
    "schedule",
    [
        pytest.param(PaceSchedule.constant(2.0), id="constant"),
        pytest.param(PaceSchedule.quantile(0.5, 1.0, 2), id="quantile"),
    ],
)
def test_anchor_weighting_equals_weights_by_hand(schedule: PaceSchedule, device: torch.device) -> None:
    z, tags = batch(device, seed=3)
    z.requires_grad_(True)
    spl = SelfPacedWeighting("linear", schedule, target="anchors")
    levels = comcl_levels(1.0, 0.5, 2.0)
    loss, stats = MultiLevelContrastiveLoss(levels, weighting=spl)(z, tags)
    unit = [Level(lv.name, lv.anchors, lv.positives, lv.relation, lv.negatives) for lv in levels]  # weight 1
    per_anchor, unit_stats = multilevel_info_nce(z, tags, unit, reduction="none")
    expected = z.sum() * 0
    for lv, row in zip(levels, per_anchor, strict=True):
        valid = unit_stats[lv.name].valid
        v = spl(row.detach(), valid)
        expected = expected + lv.weight * (v * row)[valid].sum() / valid.sum()
    torch.testing.assert_close(loss, expected, **TOL64)
    torch.testing.assert_close(grads(loss, z), grads(expected, z), **TOL64)


def test_step_advances_the_pace_once_per_weighting(device: torch.device) -> None:
    shared = SelfPacedWeighting("linear", PaceSchedule.linear(0.1, 1.0, 10))
    criterion = MultiLevelContrastiveLoss(weighting=shared)
    assert shared.schedule.step_count == 0
    criterion.step()
    assert shared.schedule.step_count == 1  # shared by three levels, stepped once
    criterion.step(3)
    assert shared.schedule.step_count == 4
    assert shared.lam() == pytest.approx(0.1 + 0.9 * 4 / 10)
    a = SelfPacedWeighting("hard", PaceSchedule.step([0.2, 0.8], [1]))
    b = SelfPacedWeighting("hard", PaceSchedule.step([0.2, 0.8], [1]))
    two = MultiLevelContrastiveLoss(weighting={"lesion": a, "healthy": b})
    z, tags = batch(device, seed=4)
    before, _ = two(z, tags)
    two.step()
    assert (a.schedule.step_count, b.schedule.step_count) == (1, 1)
    after, _ = two(z, tags)
    assert not torch.allclose(before, after)  # more negatives admitted at the higher pace


def test_state_dict_round_trip(device: torch.device) -> None:
    def make() -> MultiLevelContrastiveLoss:
        spl = SelfPacedWeighting("linear", PaceSchedule.linear(0.1, 1.0, 10))
        return MultiLevelContrastiveLoss(weighting={"lesion": spl, "quality": spl})

    criterion = make()
    criterion.step(3)
    z, tags = batch(device, seed=5)
    loss, _ = criterion(z, tags)
    buffer = io.BytesIO()
    torch.save(criterion.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    restored = make()
    assert restored.weightings["lesion"].schedule.step_count == 0
    restored.load_state_dict(state)
    assert restored.weightings["lesion"].schedule.step_count == 3
    assert restored.weightings["quality"].schedule.step_count == 3
    torch.testing.assert_close(restored(z, tags)[0], loss, **TOL64)


def test_module_in_a_training_step(device: torch.device) -> None:
    torch.manual_seed(0)
    model = nn.Linear(8, 4).to(device)
    criterion = MultiLevelContrastiveLoss(weighting=SelfPacedWeighting("linear", PaceSchedule.linear(0.2, 1.0, 3)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _, tags = batch(device)
    for _ in range(3):
        x = torch.randn(len(tags), 8, device=device)
        loss, stats = criterion(model(x), tags)
        assert torch.isfinite(loss)
        assert loss.dtype == torch.float32
        opt.zero_grad()
        loss.backward()
        opt.step()
        criterion.step()
    assert all(int(s.anchors) > 0 for s in stats.values())


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        pytest.param({"temperature": 0.0}, ValueError, "`temperature`.*0.0", id="temperature-0"),
        pytest.param({"temperature": -1}, ValueError, "`temperature`", id="temperature-neg"),
        pytest.param({"temperature": float("inf")}, ValueError, "`temperature`", id="temperature-inf"),
        pytest.param({"k": 0}, ValueError, "`k`.*0", id="k-0"),
        pytest.param({"k": 2.5}, TypeError, "`k` to be an int, but got float", id="k-float"),
        pytest.param({"k": True}, TypeError, "`k` to be an int, but got bool", id="k-bool"),
        pytest.param({"temperature": torch.tensor(0.1)}, TypeError, "`temperature`.*Tensor", id="temperature-tensor"),
        pytest.param({"temperature": "0.1"}, TypeError, "`temperature`.*str", id="temperature-str"),
        pytest.param({"temperature": True}, TypeError, "`temperature`.*bool", id="temperature-bool"),
        pytest.param({"tau_plus": torch.tensor(0.1)}, TypeError, "`tau_plus`.*Tensor", id="tau-plus-tensor"),
        pytest.param({"beta": "1"}, TypeError, "`beta`.*str", id="beta-str"),
        pytest.param({"levels": []}, ValueError, "`levels`", id="no-levels"),
        pytest.param({"levels": [Level.instance(), Level.instance()]}, ValueError, "unique level names", id="dup"),
        pytest.param({"levels": ["lesion"]}, TypeError, "`levels`", id="not-a-level"),
        pytest.param(
            {"weighting": {"lesions": SelfPacedWeighting()}}, ValueError, "`weighting`.*lesions", id="unknown-level"
        ),
        pytest.param({"weighting": {"lesion": 0.5}}, TypeError, "`weighting\\['lesion'\\]`", id="mapping-value"),
        pytest.param({"weighting": "linear"}, TypeError, "`weighting`", id="weighting-type"),
        pytest.param(
            {"levels": [Level("a.b")], "weighting": SelfPacedWeighting()}, ValueError, "level names", id="dotted-name"
        ),
    ],
)
def test_bad_arguments_raise(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        MultiLevelContrastiveLoss(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param({"denominator": "both"}, "`denominator`", id="denominator"),
        pytest.param({"tau_plus": 1.5}, "`tau_plus`", id="tau-plus"),
        pytest.param({"beta": -1.0}, "`beta`", id="beta"),
        pytest.param({"impl": "cuda"}, "`impl`", id="impl"),
    ],
)
def test_bad_options_raise_at_the_latest_on_call(kwargs: dict[str, Any], match: str, device: torch.device) -> None:
    z, tags = batch(device)
    with pytest.raises(ValueError, match=match):
        MultiLevelContrastiveLoss(**kwargs)(z, tags)


def test_bad_calls_raise(device: torch.device) -> None:
    z, tags = batch(device)
    criterion = MultiLevelContrastiveLoss()
    with pytest.raises(ValueError, match="`index`"):
        criterion(z, tags, keys=z)
    with pytest.raises(ValueError, match="`embeddings` and `tags`"):
        criterion(z[:-1], tags)
    with pytest.raises(ValueError, match="tags.label"):
        MultiLevelContrastiveLoss([Level.supervised()])(z, tags)
    one = SelfPacedWeighting("linear", target="anchors")
    partial = MultiLevelContrastiveLoss(weighting={"lesion": one})
    with pytest.raises(ValueError, match="[Aa]nchor weighting"):
        partial(z, tags)


def test_a_batch_without_any_anchor_logs_a_warning_once(caplog: pytest.LogCaptureFixture) -> None:
    criterion = MultiLevelContrastiveLoss()
    tags = ViewTags(kind=[1, 1, 1, 0, 0], quality=[0, 0, 1, 0, 1], source=[4] * 5)  # one source: no negative
    z = torch.randn(5, 8, requires_grad=True)
    with caplog.at_level(logging.WARNING, logger="mlcl_losses.loss"):
        for _ in range(2):
            loss, stats = criterion(z, tags)
            assert loss.item() == 0.0
            assert all(int(s.anchors) == 0 for s in stats.values())
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1
    assert "no level has an anchor" in warned[0].getMessage()
    assert "loss is 0" in warned[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mlcl_losses.loss"):
        MultiLevelContrastiveLoss()(*batch(torch.device("cpu")))
    assert not caplog.records  # a batch with anchors logs nothing


# --------------------------------------------------------------------------- with a hard-negative index
def _index_setup(n_bank: int, seed: int, with_label: bool):
    from mlcl_losses.index import HardNegativeIndex

    g = torch.Generator().manual_seed(seed)
    n_src = 6
    kind = torch.tensor([1, 1, 1] * (n_src // 2) + [0, 0] * (n_src // 2))
    quality = torch.tensor([0, 0, 1] * (n_src // 2) + [0, 1] * (n_src // 2))
    source = torch.tensor(
        [s for s in range(n_src // 2) for _ in range(3)] + [s for s in range(3, n_src) for _ in range(2)]
    )
    label = torch.randint(0, 3, (n_src,), generator=g)[source] if with_label else None
    tags = ViewTags(kind=kind, quality=quality, source=source, label=label, image=source // 2)
    bank_tags = ViewTags(
        kind=torch.randint(0, 2, (n_bank,), generator=g),
        quality=torch.randint(0, 2, (n_bank,), generator=g),
        source=torch.randint(0, 20, (n_bank,), generator=g),  # some share a batch source: never negatives
        label=torch.randint(0, 3, (n_bank,), generator=g) if with_label else None,
        image=torch.randint(0, 12, (n_bank,), generator=g),
    )
    bank = torch.randn(n_bank, 16, generator=g, dtype=torch.float64)
    index = HardNegativeIndex(dim=16, capacity=64, backend="torch", dtype=torch.float32)
    index.add(bank.float(), bank_tags)
    z = torch.randn(len(tags), 16, generator=g, dtype=torch.float64)
    return z, tags, index


def _top_k_by_hand(z, tags, index, level, k):
    """Each anchor's k most similar allowed bank entries, written out with the level's own mask."""
    from mlcl_losses.levels import bank_negative_mask

    n_valid = len(index)
    bank = torch.nn.functional.normalize(index.embeddings[:n_valid].double(), dim=1)
    cos = torch.nn.functional.normalize(z, dim=1) @ bank.T
    allowed = bank_negative_mask(tags, index.tags[:n_valid], level)
    cos = cos.masked_fill(~allowed, float("-inf"))
    top = cos.topk(min(k, n_valid), dim=1)
    cand = torch.where(torch.isfinite(top.values), top.indices, -1)
    return torch.nn.functional.pad(cand, (0, k - cand.shape[1]), value=-1)


@pytest.mark.parametrize("with_label", [False, True], ids=["no-label", "label"])
@pytest.mark.parametrize("k", [3, 8], ids=["k3", "k8"])
def test_index_negatives_are_each_levels_top_k_allowed_entries(k: int, with_label: bool) -> None:
    z, tags, index = _index_setup(n_bank=40, seed=k, with_label=with_label)
    levels = [*comcl_levels(), Level.supervised(name="sup")] if with_label else comcl_levels()
    criterion = MultiLevelContrastiveLoss(levels, temperature=0.2, index=index, k=k, impl="reference")
    loss, stats = criterion(z, tags)
    candidates = [_top_k_by_hand(z, tags, index, level, k) for level in levels]
    expected, expected_stats = multilevel_info_nce(
        z, tags, levels, temperature=0.2, bank=(index.embeddings, index.tags), candidates=candidates, impl="reference"
    )
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)  # index searches in float32
    for name in expected_stats:
        assert int(stats[name].anchors) == int(expected_stats[name].anchors)


def test_index_bank_handed_to_the_loss_is_the_unique_hits(monkeypatch: pytest.MonkeyPatch) -> None:
    """The loss receives only the searched rows (``U <= N k`` per level), renumbered, never the whole buffer."""
    z, tags, index = _index_setup(n_bank=40, seed=3, with_label=False)
    seen: dict[str, Any] = {}

    original = loss_module.loss_with_options

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(loss_module, "loss_with_options", spy)
    criterion = MultiLevelContrastiveLoss(comcl_levels(), temperature=0.2, index=index, k=4, impl="reference")
    criterion(z, tags)
    bank, bank_tags = seen["bank"]
    hits = torch.cat([c[c >= 0] for c in seen["candidates"]])
    assert bank.shape[0] == hits.unique().numel() < index.capacity
    assert sorted(hits.unique().tolist()) == list(range(bank.shape[0]))  # every row used, none twice
    assert bank.device == z.device
    assert bank_tags.device == z.device
    # the rows are the index's own: each hit's embedding is a slot of the buffer with the same tags
    slots = (
        torch.nn.functional.normalize(bank, dim=1) @ torch.nn.functional.normalize(index.embeddings[:40], dim=1).T
    ).argmax(1)
    torch.testing.assert_close(bank, index.embeddings[slots])
    assert torch.equal(bank_tags.source, index.tags.source[slots])


def test_index_with_k_covering_the_bank_equals_the_whole_bank() -> None:
    z, tags, index = _index_setup(n_bank=30, seed=0, with_label=False)
    levels = comcl_levels()
    criterion = MultiLevelContrastiveLoss(levels, temperature=0.2, index=index, k=30, impl="reference")
    loss, _ = criterion(z, tags)
    whole, _ = multilevel_info_nce(
        z, tags, levels, temperature=0.2, bank=(index.embeddings[:30].double(), index.tags[:30]), impl="reference"
    )
    torch.testing.assert_close(loss, whole, rtol=1e-6, atol=1e-6)


def test_keys_are_enqueued_after_the_loss() -> None:
    z, tags, index = _index_setup(n_bank=10, seed=1, with_label=False)
    criterion = MultiLevelContrastiveLoss(comcl_levels(), index=index, k=4)
    before = len(index)
    criterion(z.float(), tags, keys=z.float() * 2)
    assert len(index) == before + len(tags)
    assert torch.equal(index.tags.source[before : before + len(tags)], tags.source)


def test_keys_without_index_raise() -> None:
    criterion = MultiLevelContrastiveLoss(comcl_levels())
    z, tags, _ = _index_setup(n_bank=4, seed=2, with_label=False)
    with pytest.raises(ValueError, match="no `index`"):
        criterion(z, tags, keys=z)


def test_index_inputs_are_checked_even_while_the_index_is_empty() -> None:
    from mlcl_losses.index import HardNegativeIndex

    z, tags = batch(torch.device("cpu"))  # D = 8
    criterion = MultiLevelContrastiveLoss(index=HardNegativeIndex(dim=16, capacity=32, backend="torch"), k=4)
    with pytest.raises(ValueError, match=r"`embeddings` of dimension 16 \(the `dim` of the loss's index\).*\(15, 8\)"):
        criterion(z, tags)
    z16 = torch.randn(len(tags), 16, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"`keys` of dimension 16.*\(15, 8\)"):
        criterion(z16, tags, keys=z)
    with pytest.raises(ValueError, match=r"`keys` without `key_tags`.*\(15\), but got 3"):
        criterion(z16, tags, keys=z16[:3])
    with pytest.raises(ValueError, match=r"`key_tags` were given without `keys`"):
        criterion(z16, tags, key_tags=tags)
    with pytest.raises(ValueError, match=r"`key_tags` were given without `keys`"):
        MultiLevelContrastiveLoss()(z, tags, key_tags=tags)
    assert criterion.index is not None
    assert len(criterion.index) == 0  # nothing was enqueued
    criterion(z16, tags, keys=z16)
    assert len(criterion.index) == len(tags)


def test_k_larger_than_index_capacity_raises() -> None:
    from mlcl_losses.index import HardNegativeIndex

    with pytest.raises(ValueError, match="capacity"):
        MultiLevelContrastiveLoss(comcl_levels(), index=HardNegativeIndex(dim=4, capacity=8, backend="torch"), k=9)


@pytest.mark.cuda
@pytest.mark.parametrize("impl", IMPLS)
def test_cpu_index_serves_cuda_embeddings(impl: str) -> None:
    """A CPU index with CUDA embeddings (single process): the loss of the same batch on the CPU.

    The index's rows move to the embeddings' device; gradients stay on CUDA, the index stays on
    the CPU, and the CUDA keys are enqueued into it as the CPU keys are into the CPU index.
    """
    z, tags, index = _index_setup(n_bank=40, seed=5, with_label=False)
    _, _, cpu_index = _index_setup(n_bank=40, seed=5, with_label=False)  # the same bank, for the CPU run
    z = z.float()
    levels = comcl_levels()
    on_cpu = MultiLevelContrastiveLoss(levels, temperature=0.2, index=cpu_index, k=8, impl=impl)
    z_cpu = z.clone().requires_grad_()
    expected, expected_stats = on_cpu(z_cpu, tags, keys=2 * z)
    expected.backward()

    on_cuda = MultiLevelContrastiveLoss(levels, temperature=0.2, index=index, k=8, impl=impl)
    z_cuda = z.cuda().requires_grad_()
    before = len(index)
    loss, stats = on_cuda(z_cuda, tags.to("cuda"), keys=2 * z_cuda.detach())
    loss.backward()

    assert loss.device.type == "cuda"
    torch.testing.assert_close(loss.cpu(), expected.detach(), rtol=1e-5, atol=1e-5)
    assert z_cuda.grad is not None
    assert z_cuda.grad.device.type == "cuda"
    torch.testing.assert_close(z_cuda.grad.cpu(), z_cpu.grad, rtol=1e-4, atol=1e-6)
    for name, s in expected_stats.items():
        assert int(stats[name].anchors) == int(s.anchors)
    assert index.embeddings.device.type == "cpu"
    assert len(index) == len(cpu_index) == before + len(tags)
    torch.testing.assert_close(index.embeddings, cpu_index.embeddings, rtol=1e-6, atol=1e-6)
    assert torch.equal(index.tags.source, cpu_index.tags.source)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc (VmHWM reset)")
@pytest.mark.parametrize(
    "backend",
    ["torch", pytest.param("faiss", marks=pytest.mark.skipif(not faiss_available(), reason="faiss not installed"))],
)
def test_memory_with_an_index_does_not_grow_with_capacity(backend: str) -> None:
    """Peak resident memory of a step with an index is the same at 16k and 1M slots (a ratio, in subprocesses).

    Only the ``N k`` rows the searches return are read, by the loss and by the functional given the
    whole buffer with candidates; before, the bank was copied whole (twice: 256 MiB at 1M slots).
    With ``faiss`` the index is full and the step includes the exact search, which gathers the
    allowed entries one block at a time; before, it gathered them all (64 MiB at 1M slots).
    """
    script = Path(__file__).with_name("loss_memory_case.py")
    src = str(Path(mlcl_losses.__file__).resolve().parents[1])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
        "MALLOC_MMAP_THRESHOLD_": "65536",  # freed blocks go back to the OS, so VmHWM - VmRSS is the step's peak
        "MALLOC_TRIM_THRESHOLD_": "65536",
    }
    growth = {}
    for capacity in (1 << 14, 1 << 20):
        done = subprocess.run(
            [sys.executable, str(script), str(capacity), backend], capture_output=True, text=True, env=env, check=False
        )
        assert done.returncode == 0, done.stderr[-2000:]
        result = json.loads(done.stdout.strip().splitlines()[-1])
        growth[capacity], bank_kib = result["growth_kib"], result["bank_kib"]
    floor_kib = 4096  # below 4 MiB the growth is allocator noise; the 1M-slot buffer alone is 128 MiB
    for mode in ("loss", "functional"):
        # Never a copy of the buffer: what may grow are the predicate's bool masks (1/128 of it at D = 32).
        assert growth[1 << 20][mode] - growth[1 << 14][mode] < bank_kib / 32, (mode, growth)
        if backend == "torch":  # 4096 entries: nothing grows with the capacity
            ratio = (growth[1 << 20][mode] + floor_kib) / (growth[1 << 14][mode] + floor_kib)
            assert ratio < 1.5, (mode, growth)
