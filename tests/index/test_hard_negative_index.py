"""HardNegativeIndex (mlcl_losses.index.hard_negative_index): ring buffer, state, backend choice, errors."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from index_cases import BACKENDS, HAS_FAISS, random_tags

from mlcl_losses.index import HardNegativeIndex
from mlcl_losses.levels import Select
from mlcl_losses.tags import ViewTags


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_index_returns_padding(backend: str, device: torch.device) -> None:
    index = HardNegativeIndex(4, 10, device=device, backend=backend)
    result = index.search(torch.randn(3, 4, device=device), 5)
    assert (result.indices == -1).all()
    assert torch.isneginf(result.similarities).all()
    assert len(index) == 0


# ---------------------------------------------------------------------------------------------- ring buffer


@pytest.mark.parametrize("backend", BACKENDS)
def test_wraparound_keeps_newest_capacity(backend: str, device: torch.device) -> None:
    cap, dim = 10, 4
    index = HardNegativeIndex(dim, cap, device=device, backend=backend, normalize=False)
    rows, sources = [], []
    for step, b in enumerate([3, 4, 6, 2, 11, 1]):
        x = torch.randn(b, dim)
        src = torch.arange(b) + 100 * step
        index.add(x.to(device), ViewTags(torch.zeros(b, dtype=torch.long), torch.zeros(b, dtype=torch.long), src))
        rows.append(x)
        sources.append(src)
        newest_x = torch.cat(rows)[-cap:]
        newest_src = torch.cat(sources)[-cap:]
        size = len(index)
        assert size == min(cap, len(torch.cat(rows)))
        stored = index.tags.source[:size].cpu()
        assert sorted(stored.tolist()) == sorted(newest_src[-size:].tolist())
        for slot in range(size):
            pos = (newest_src[-size:] == stored[slot]).nonzero()[0, 0]
            torch.testing.assert_close(index.embeddings[slot].cpu(), newest_x[-size:][pos])
    # B > capacity keeps the last `capacity` rows in order
    index.reset()
    x = torch.randn(25, dim)
    index.add(x.to(device), ViewTags([0] * 25, [0] * 25, list(range(25))))
    assert index.tags.source.tolist() == list(range(15, 25))
    torch.testing.assert_close(index.embeddings.cpu(), x[15:])


def test_add_normalises_and_reset_zeroes(device: torch.device) -> None:
    index = HardNegativeIndex(3, 5, device=device)
    index.add(torch.tensor([[3.0, 4.0, 0.0]], device=device), ViewTags([1], [1], [7], label=[2], image=[3]))
    torch.testing.assert_close(index.embeddings[0].cpu(), torch.tensor([0.6, 0.8, 0.0]))
    assert index.tags.label is not None
    assert index.tags.image is not None
    index.reset()
    assert len(index) == 0
    assert (index.embeddings == 0).all()
    assert index.tags.label is None


# ---------------------------------------------------------------------------------------------- state machine


class IndexMachine(RuleBasedStateMachine):
    """Random add / search / reset sequences against a plain Python model of the ring buffer."""

    backend = "torch"
    dim, capacity = 6, 12

    @initialize(normalize=st.booleans())
    def setup(self, normalize: bool) -> None:
        self.index = HardNegativeIndex(self.dim, self.capacity, backend=self.backend, normalize=normalize)
        self.normalize = normalize
        self.model: list[tuple[list[float], int, int, int]] = []  # (vector, kind, quality, source), oldest first
        self.slots: dict[int, int] = {}  # model position -> slot
        self.ptr = 0
        self.counter = 0

    @rule(b=st.integers(0, 30), seed=st.integers(0, 2**16))
    def add(self, b: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(b, self.dim, generator=gen)
        kind = torch.randint(0, 2, (b,), generator=gen)
        quality = torch.randint(0, 2, (b,), generator=gen)
        source = torch.arange(self.counter, self.counter + b) % 5
        self.counter += b
        self.index.add(x, ViewTags(kind, quality, source))
        stored = torch.nn.functional.normalize(x, dim=1) if self.normalize else x
        for i in range(b):
            self.model.append((stored[i].tolist(), int(kind[i]), int(quality[i]), int(source[i])))
        self.model = self.model[-self.capacity :]

    @rule()
    def reset(self) -> None:
        self.index.reset()
        self.model = []

    @rule(
        n=st.integers(1, 4),
        k=st.integers(1, 12),
        kind=st.sampled_from([None, 0, 1]),
        exclude=st.booleans(),
        seed=st.integers(0, 2**16),
    )
    def search(self, n: int, k: int, kind: int | None, exclude: bool, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        q = torch.randn(n, self.dim, generator=gen)
        excl = torch.randint(0, 5, (n,), generator=gen) if exclude else None
        result = self.index.search(q, k, negatives=Select(kind=kind), exclude_source=excl)
        qn = torch.nn.functional.normalize(q, dim=1) if self.normalize else q
        # expected similarities from the model alone (no knowledge of slots)
        for row in range(n):
            allowed = [
                sum(a * b for a, b in zip(qn[row].tolist(), vec, strict=True))
                for vec, kd, _, src in self.model
                if (kind is None or kd == kind) and (excl is None or src != int(excl[row]))
            ]
            expected = sorted(allowed, reverse=True)[:k]
            got = result.similarities[row]
            assert torch.isneginf(got[len(expected) :]).all()
            assert (result.indices[row, len(expected) :] == -1).all()
            torch.testing.assert_close(got[: len(expected)], torch.tensor(expected), atol=1e-5, rtol=0)
            hits = result.tags.kind[row, : len(expected)]
            if kind is not None:
                assert (hits == kind).all()
            if excl is not None:
                assert (result.tags.source[row, : len(expected)] != excl[row]).all()

    @invariant()
    def contents_match_model(self) -> None:
        if not hasattr(self, "index"):
            return
        assert len(self.index) == len(self.model)
        size = len(self.index)
        stored = sorted(zip(self.index.tags.source[:size].tolist(), self.index.embeddings[:size].tolist(), strict=True))
        expected = sorted((src, vec) for vec, _, _, src in self.model)
        assert [s for s, _ in stored] == [s for s, _ in expected]
        for (_, a), (_, b) in zip(stored, expected, strict=True):
            torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-6, rtol=0)


TestIndexMachineTorch = IndexMachine.TestCase
TestIndexMachineTorch.settings = settings(max_examples=15, stateful_step_count=12, deadline=None)


class FaissIndexMachine(IndexMachine):
    backend = "faiss"


TestIndexMachineFaiss = pytest.mark.skipif(not HAS_FAISS, reason="faiss not installed")(FaissIndexMachine.TestCase)
TestIndexMachineFaiss.settings = settings(max_examples=15, stateful_step_count=12, deadline=None)


# ---------------------------------------------------------------------------------------------- state


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_round_trip_continues_wraparound(backend: str, device: torch.device, tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    a = HardNegativeIndex(8, 20, device=device, backend=backend)
    a.add(torch.randn(27, 8, generator=gen).to(device), random_tags(27, gen))
    a.add(torch.randn(5, 8, generator=gen).to(device), random_tags(5, gen))
    path = tmp_path / "index.pt"
    torch.save(a.state_dict(), path)
    state = torch.load(path, weights_only=True)
    b = HardNegativeIndex(8, 20, device=device, backend=backend)
    b.load_state_dict(state)
    assert len(b) == len(a)
    assert b.tags.equal(a.tags)
    torch.testing.assert_close(b.embeddings, a.embeddings)
    # the write pointer travelled too: the next add lands in the same slots
    x, t = torch.randn(9, 8, generator=gen).to(device), random_tags(9, gen)
    a.add(x, t)
    b.add(x, t)
    torch.testing.assert_close(b.embeddings, a.embeddings)
    assert b.tags.equal(a.tags)
    q = torch.randn(4, 8, generator=gen).to(device)
    assert torch.equal(a.search(q, 5).indices, b.search(q, 5).indices)


def test_state_dict_holds_plain_tensors_and_ints() -> None:
    index = HardNegativeIndex(4, 6)
    state = index.state_dict()
    extra = state.pop("_extra_state")
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert all(isinstance(v, int) for v in extra.values())
    with pytest.raises(ValueError, match="capacity"):
        HardNegativeIndex(4, 7).load_state_dict(index.state_dict())


def test_state_dict_without_extra_state_is_refused_even_non_strict() -> None:
    index = HardNegativeIndex(4, 8, backend="torch")
    index.add(torch.eye(4), ViewTags([0] * 4, [0] * 4, list(range(4))))
    state = {k: v for k, v in index.state_dict().items() if k != "_extra_state"}
    fresh = HardNegativeIndex(4, 8, backend="torch")
    with pytest.raises(ValueError, match=r"`state_dict` to hold '_extra_state'.*write pointer and fill level"):
        fresh.load_state_dict(state, strict=False)
    assert len(fresh) == 0
    parent = torch.nn.ModuleDict({"bank": HardNegativeIndex(4, 8, backend="torch")})  # as a submodule too
    with pytest.raises(ValueError, match="'bank._extra_state'"):
        parent.load_state_dict({f"bank.{k}": v for k, v in state.items()}, strict=False)


@pytest.mark.parametrize("normalize", [True, False], ids=["normalize", "raw"])
def test_add_refuses_all_zero_rows(normalize: bool) -> None:
    index = HardNegativeIndex(3, 8, backend="torch", normalize=normalize)
    x = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match=r"`embeddings` rows with a non-zero norm.*row 1 is all zeros"):
        index.add(x, ViewTags([0, 0], [0, 0], [0, 1]))
    assert len(index) == 0  # nothing was written


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [1e-20, 1e20, 1e-40], ids=["tiny", "huge", "subnormal"])
def test_normalize_handles_tiny_and_huge_rows(backend: str, scale: float) -> None:
    gen = torch.Generator().manual_seed(3)
    v = torch.randn(6, 8, generator=gen)
    index = HardNegativeIndex(8, 16, backend=backend)
    index.add(v * scale, ViewTags([0] * 6, [0] * 6, list(range(6))))
    unit = torch.nn.functional.normalize(v.double(), dim=1)
    expected = (unit[:2] @ unit.T).topk(3, dim=1)
    for queries in (v[:2], v[:2] * scale):  # either scale of the query: cosine, not dot product
        result = index.search(queries, 3)
        assert result.indices.tolist() == expected.indices.tolist()
        torch.testing.assert_close(result.similarities.double(), expected.values, atol=1e-5, rtol=0)
        assert result.similarities[:, 0].tolist() == pytest.approx([1.0, 1.0], abs=1e-5)


@pytest.mark.parametrize("normalize", [True, False], ids=["normalize", "raw"])
def test_search_refuses_all_zero_queries(normalize: bool) -> None:
    index = HardNegativeIndex(3, 8, backend="torch", normalize=normalize)
    index.add(torch.eye(3), ViewTags([0] * 3, [0] * 3, [0, 1, 2]))
    with pytest.raises(ValueError, match=r"`queries` rows with a non-zero norm.*row 1 is all zeros"):
        index.search(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]), 1)
    with pytest.raises(ValueError, match=r"`queries`.*row 0 is all zeros"):
        HardNegativeIndex(3, 8, backend="torch", normalize=normalize).search(torch.zeros(1, 3), 1)  # empty bank too


def test_raw_half_bank_refuses_entries_it_cannot_hold() -> None:
    index = HardNegativeIndex(2, 4, backend="torch", dtype=torch.float16, normalize=False)
    with pytest.raises(ValueError, match=r"`embeddings` entries within \+-6\.55e\+04.*float16.*row 1 exceeds"):
        index.add(torch.tensor([[1.0, 0.0], [1e5, 1.0]]), ViewTags([0, 0], [0, 0], [0, 1]))
    assert len(index) == 0


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda i: i.add(torch.randn(2, 5), ViewTags([0, 0], [0, 0], [0, 1])), ValueError, r"shape \(N, 4\)"),
        (lambda i: i.add(torch.full((2, 4), math.nan), ViewTags([0, 0], [0, 0], [0, 1])), ValueError, "NaN or inf"),
        (lambda i: i.add(torch.randn(3, 4), ViewTags([0, 0], [0, 0], [0, 1])), ValueError, "same length"),
        (lambda i: i.add(torch.randn(2, 4), [0, 1]), TypeError, "ViewTags"),
        (lambda i: i.add(torch.ones(2, 4, dtype=torch.long), ViewTags([0, 0], [0, 0], [0, 1])), TypeError, "floating"),
        (lambda i: i.search(torch.randn(2, 3), 1), ValueError, r"`queries` of shape \(N, 4\)"),
        (lambda i: i.search(torch.tensor([[0.0, math.inf, 0, 0]]), 1), ValueError, "`queries`"),
        (lambda i: i.search(torch.randn(2, 4), 0), ValueError, "`k`"),
        (lambda i: i.search(torch.randn(2, 4), 11), ValueError, r"capacity \(10\), but got 11"),
        (lambda i: i.search(torch.randn(2, 4), 2.0), TypeError, "`k`"),
        (lambda i: i.search(torch.randn(2, 4), 1, exclude_source=torch.zeros(3, dtype=torch.long)), ValueError, "same"),
        (lambda i: i.search(torch.randn(2, 4), 1, exclude_image=torch.zeros(2)), TypeError, "exclude_image"),
        (lambda i: i.search(torch.randn(2, 4), 1, negatives="healthy"), TypeError, "negatives"),
    ],
    ids=[
        "add-dim",
        "add-nan",
        "add-tags-length",
        "add-tags-type",
        "add-int",
        "search-dim",
        "search-inf",
        "k-zero",
        "k-over-capacity",
        "k-float",
        "exclude-length",
        "exclude-dtype",
        "negatives-type",
    ],
)
def test_bad_input_raises(call, error: type[Exception], match: str) -> None:
    index = HardNegativeIndex(4, 10, backend="torch")
    with pytest.raises(error, match=match):
        call(index)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"dim": 0, "capacity": 3}, ValueError, "`dim`"),
        ({"dim": 4, "capacity": -1}, ValueError, "`capacity`"),
        ({"dim": 4.0, "capacity": 3}, TypeError, "`dim`"),
        ({"dim": 4, "capacity": 3, "backend": "annoy"}, ValueError, "`backend`.*annoy"),
        ({"dim": 4, "capacity": 3, "dtype": torch.int32}, ValueError, "`dtype`"),
        ({"dim": 4, "capacity": 3, "ivf_nlist": 8}, ValueError, "ivf_nlist"),
        ({"dim": 4, "capacity": 3, "chunk_size": 0}, ValueError, "chunk_size"),
        ({"dim": 4, "capacity": 3, "chunk_size": True}, TypeError, "`chunk_size` to be an int, but got bool"),
        ({"dim": 4, "capacity": 3, "nprobe": True}, TypeError, "`nprobe` to be an int, but got bool"),
        ({"dim": 4, "capacity": 3, "nprobe": 0}, ValueError, "`nprobe` > 0"),
        ({"dim": 4, "capacity": 3, "normalize": "no"}, TypeError, "`normalize` to be a bool, but got str"),
        ({"dim": 4, "capacity": 3, "backend": "faiss", "ivf_nlist": True}, TypeError, "`ivf_nlist`.*got True"),
        ({"dim": 4, "capacity": 3, "backend": "faiss", "ivf_nlist": 0}, ValueError, "`ivf_nlist`.*got 0"),
    ],
    ids=[
        "dim",
        "capacity",
        "dim-type",
        "backend",
        "dtype",
        "ivf-without-faiss-backend",
        "chunk",
        "chunk-bool",
        "nprobe-bool",
        "nprobe",
        "normalize-str",
        "ivf-bool",
        "ivf-zero",
    ],
)
def test_bad_construction_raises(kwargs, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        HardNegativeIndex(**kwargs)


def test_optional_tags_must_stay_consistent() -> None:
    index = HardNegativeIndex(4, 10)
    index.add(torch.randn(2, 4), ViewTags([0, 0], [0, 0], [0, 1], label=[1, 2]))
    with pytest.raises(ValueError, match="same optional tags"):
        index.add(torch.randn(2, 4), ViewTags([0, 0], [0, 0], [0, 1]))
    with pytest.raises(ValueError, match="no image tags"):
        index.search(torch.randn(1, 4), 1, exclude_image=torch.zeros(1, dtype=torch.long))


def test_auto_logs_its_choice(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="mlcl_losses.index"):
        index = HardNegativeIndex(4, 10)
    assert any("backend='auto'" in r.getMessage() for r in caplog.records)
    expected = "faiss" if HAS_FAISS else "torch"
    assert index.backend_name == expected


def test_auto_uses_torch_for_half_bank_on_cpu() -> None:
    assert HardNegativeIndex(4, 10, dtype=torch.float16).backend_name == "torch"
