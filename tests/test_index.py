"""Tests of mlcl_losses.index: every backend against brute force, filters, ring buffer, state, errors."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from mlcl_losses.index import HardNegativeIndex, SearchResult, faiss_available, faiss_gpu_available
from mlcl_losses.levels import Level, Select
from mlcl_losses.tags import ViewTags

HAS_FAISS = faiss_available()
BACKENDS = [
    pytest.param("torch", id="torch"),
    pytest.param("faiss", id="faiss", marks=pytest.mark.skipif(not HAS_FAISS, reason="faiss not installed")),
]


def random_tags(n: int, gen: torch.Generator, *, n_sources: int = 10, label: bool = True, image: bool = True):
    return ViewTags(
        kind=torch.randint(0, 2, (n,), generator=gen),
        quality=torch.randint(0, 2, (n,), generator=gen),
        source=torch.randint(0, n_sources, (n,), generator=gen),
        label=torch.randint(0, 3, (n,), generator=gen) if label else None,
        image=torch.randint(0, n_sources // 2 + 1, (n,), generator=gen) if image else None,
    )


def brute_force(
    bank: torch.Tensor,
    bank_tags: ViewTags,
    queries: torch.Tensor,
    k: int,
    select: Select | None = None,
    exclude_source: torch.Tensor | None = None,
    exclude_image: torch.Tensor | None = None,
    exclude_label: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(N, M)`` float64 similarities with disallowed entries at -inf (bank and queries already normalised)."""
    sims = queries.double() @ bank.double().T
    allowed = torch.ones_like(sims, dtype=torch.bool)
    if select is not None:
        allowed &= select(bank_tags)[None, :]
    for q, b in (
        (exclude_source, bank_tags.source),
        (exclude_image, bank_tags.image),
        (exclude_label, bank_tags.label),
    ):
        if q is not None:
            allowed &= q[:, None] != b[None, :]
    return sims.masked_fill(~allowed, -math.inf)


def assert_matches_brute_force(result: SearchResult, ref_sims: torch.Tensor, k: int, atol: float = 1e-5) -> None:
    """Same hits as brute force up to exact ties; padding where fewer than k entries are allowed."""
    sims, idx = result.similarities.cpu(), result.indices.cpu()
    assert sims.dtype == torch.float32
    assert idx.dtype == torch.int64
    assert sims.shape == idx.shape == (ref_sims.shape[0], k)
    ref_top = torch.topk(ref_sims, min(k, ref_sims.shape[1]), dim=1).values.float()
    n_allowed = torch.isfinite(ref_sims).sum(dim=1)
    for row in range(sims.shape[0]):
        n_hit = min(k, int(n_allowed[row]))
        # padding: -inf and -1, never garbage
        assert torch.isneginf(sims[row, n_hit:]).all()
        assert (idx[row, n_hit:] == -1).all()
        hits = idx[row, :n_hit]
        assert (hits >= 0).all()
        assert len(set(hits.tolist())) == n_hit, "duplicate hits"
        # every hit is allowed and carries its true similarity ...
        true = ref_sims[row, hits].float()
        assert torch.isfinite(true).all(), "a disallowed entry was returned"
        torch.testing.assert_close(sims[row, :n_hit], true, atol=atol, rtol=0)
        # ... and the similarities are exactly the top n_hit allowed ones (same ids up to ties)
        torch.testing.assert_close(sims[row, :n_hit], ref_top[row, :n_hit], atol=atol, rtol=0)


def filled_index(backend: str, device: torch.device, n: int, capacity: int, dim: int = 16, seed: int = 0, **kwargs):
    gen = torch.Generator().manual_seed(seed)
    index = HardNegativeIndex(dim, capacity, device=device, backend=backend, **kwargs)
    x = torch.randn(n, dim, generator=gen)
    tags = random_tags(n, gen)
    index.add(x, tags)
    return index, gen


def bank_of(index: HardNegativeIndex) -> tuple[torch.Tensor, ViewTags]:
    size = len(index)
    return index.embeddings[:size].float().cpu(), index.tags[:size].to("cpu")


# ---------------------------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 7, 64], ids=lambda k: f"k{k}")
def test_unfiltered_equals_brute_force(backend: str, k: int, device: torch.device) -> None:
    index, gen = filled_index(backend, device, n=500, capacity=512)
    queries = torch.randn(37, 16, generator=gen)
    result = index.search(queries.to(device), k)
    bank, tags = bank_of(index)
    ref = brute_force(bank, tags, torch.nn.functional.normalize(queries, dim=1), k)
    assert_matches_brute_force(result, ref, k)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "select",
    [Select(), Select(kind=0), Select(kind=1, quality=1), Select(quality=0)],
    ids=["any", "healthy", "lesion-low", "high"],
)
@pytest.mark.parametrize("exclude", ["none", "source", "source+image", "all"])
def test_filtered_equals_brute_force_over_filtered_bank(
    backend: str, select: Select, exclude: str, device: torch.device
) -> None:
    index, gen = filled_index(backend, device, n=300, capacity=300)
    n = 41
    queries = torch.randn(n, 16, generator=gen)
    qtags = random_tags(n, gen)
    kwargs = {}
    if exclude != "none":
        kwargs["exclude_source"] = qtags.source
    if exclude in ("source+image", "all"):
        kwargs["exclude_image"] = qtags.image
    if exclude == "all":
        kwargs["exclude_label"] = qtags.label
    k = 50
    result = index.search(queries.to(device), k, negatives=select, **{a: v.to(device) for a, v in kwargs.items()})
    bank, tags = bank_of(index)
    ref = brute_force(bank, tags, torch.nn.functional.normalize(queries, dim=1), k, select, **kwargs)
    assert_matches_brute_force(result, ref, k)
    # hit tags are the tags of the hit slots, -1 where padded
    idx = result.indices.cpu()
    hit_tags = result.tags.to("cpu")
    assert hit_tags.shape == idx.shape
    pad = idx < 0
    for name, field in hit_tags.fields().items():
        assert field is not None
        assert (field[pad] == -1).all()
        torch.testing.assert_close(field[~pad], getattr(tags, name)[idx[~pad]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_exclusions_never_returned_with_many_duplicates(backend: str, device: torch.device) -> None:
    # Half the bank shares the query's source and sits right next to it: the over-fetch must refill.
    dim, gen = 8, torch.Generator().manual_seed(3)
    index = HardNegativeIndex(dim, 400, device=device, backend=backend)
    query = torch.randn(1, dim, generator=gen)
    near = query + 0.01 * torch.randn(200, dim, generator=gen)
    far = torch.randn(200, dim, generator=gen)
    source = torch.cat([torch.zeros(200, dtype=torch.long), torch.arange(1, 201)])
    tags = ViewTags(torch.zeros(400, dtype=torch.long), torch.zeros(400, dtype=torch.long), source)
    index.add(torch.cat([near, far]), tags)
    result = index.search(query.to(device), 20, exclude_source=torch.tensor([0], device=device))
    assert (result.tags.source != 0).all()
    assert (result.indices >= 200).all()
    bank, btags = bank_of(index)
    ref = brute_force(bank, btags, torch.nn.functional.normalize(query, dim=1), 20, exclude_source=torch.tensor([0]))
    assert_matches_brute_force(result, ref, 20)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fewer_allowed_than_k_pads(backend: str, device: torch.device) -> None:
    index = HardNegativeIndex(4, 10, device=device, backend=backend)
    index.add(torch.eye(4), ViewTags([0, 1, 1, 1], [0, 0, 0, 0], [0, 1, 2, 3]))
    result = index.search(torch.ones(2, 4, device=device), 8, negatives=Select(kind=1))
    assert (result.indices[:, :3] >= 1).all()
    assert (result.indices[:, 3:] == -1).all()
    assert torch.isneginf(result.similarities[:, 3:]).all()
    assert (result.tags.kind[:, 3:] == -1).all()
    assert result.tags.label is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_index_returns_padding(backend: str, device: torch.device) -> None:
    index = HardNegativeIndex(4, 10, device=device, backend=backend)
    result = index.search(torch.randn(3, 4, device=device), 5)
    assert (result.indices == -1).all()
    assert torch.isneginf(result.similarities).all()
    assert len(index) == 0


def test_level_negatives(device: torch.device) -> None:
    index, gen = filled_index("torch", device, n=100, capacity=100)
    queries = torch.randn(5, 16, generator=gen).to(device)
    src = torch.arange(5, device=device)
    level = Level("l", negatives=Select(kind=0))
    via_level = index.search(queries, 10, negatives=level, exclude_source=src)
    via_select = index.search(queries, 10, negatives=Select(kind=0), exclude_source=src)
    assert torch.equal(via_level.indices, via_select.indices)
    off = Level("off", bank_negatives=False)
    assert (index.search(queries, 10, negatives=off).indices == -1).all()
    with pytest.raises(ValueError, match="exclude_label"):
        index.search(queries, 10, negatives=Level.supervised())
    lab = index.search(queries, 10, negatives=Level.supervised(), exclude_label=torch.zeros(5, dtype=torch.long))
    assert (lab.tags.label != 0).all()


@pytest.mark.skipif(not HAS_FAISS, reason="faiss not installed")
def test_faiss_ivf_recall_and_filters() -> None:
    # Clustered data, every list probed: IVF must equal exact search; with few probes, high recall.
    gen = torch.Generator().manual_seed(1)
    centers = torch.randn(20, 16, generator=gen)
    x = centers[torch.randint(0, 20, (2000,), generator=gen)] + 0.3 * torch.randn(2000, 16, generator=gen)
    tags = random_tags(2000, gen)
    ivf = HardNegativeIndex(16, 2000, backend="faiss", ivf_nlist=16, nprobe=16)
    exact = HardNegativeIndex(16, 2000, backend="torch")
    for index in (ivf, exact):
        index.add(x[:1500], tags[:1500])
    q = x[:50] + 0.1 * torch.randn(50, 16, generator=gen)
    qt = random_tags(50, gen)
    kwargs = {"negatives": Select(kind=1), "exclude_source": qt.source, "exclude_label": qt.label}
    a, b = ivf.search(q, 10, **kwargs), exact.search(q, 10, **kwargs)
    torch.testing.assert_close(a.similarities, b.similarities, atol=1e-5, rtol=0)
    # the IVF index follows the ring buffer through wrap-around
    for index in (ivf, exact):
        index.add(x[1500:], tags[1500:])
        index.add(x[:700], tags[:700])
    a, b = ivf.search(q, 10, **kwargs), exact.search(q, 10, **kwargs)
    torch.testing.assert_close(a.similarities, b.similarities, atol=1e-5, rtol=0)
    ivf.nprobe = 2
    ivf._backends.clear()
    ivf._backend_for(ivf.embeddings)
    a = ivf.search(q, 10)
    b = exact.search(q, 10)
    recall = (
        sum(len(set(r.tolist()) & set(s.tolist())) for r, s in zip(a.indices, b.indices, strict=True))
        / b.indices.numel()
    )
    assert recall > 0.8
    assert (a.tags.kind[a.indices >= 0] >= 0).all()


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


def test_missing_faiss_names_package_and_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_faiss(name, *args, **kwargs):
        if name == "faiss" or name.startswith("faiss."):
            raise ImportError("No module named 'faiss'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_faiss)
    with pytest.raises(ImportError, match=r"pip install mlcl-losses\[faiss\].*backend='torch'"):
        HardNegativeIndex(4, 10, backend="faiss")
    assert HardNegativeIndex(4, 10, backend="auto").backend_name == "torch"


@pytest.mark.skipif(not HAS_FAISS, reason="faiss not installed")
def test_faiss_cpu_needs_float32() -> None:
    with pytest.raises(ValueError, match="float32"):
        HardNegativeIndex(4, 10, backend="faiss", dtype=torch.float16)


def test_auto_logs_its_choice(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="mlcl_losses.index"):
        index = HardNegativeIndex(4, 10)
    assert any("backend='auto'" in r.getMessage() for r in caplog.records)
    expected = "faiss" if HAS_FAISS else "torch"
    assert index.backend_name == expected


def test_auto_uses_torch_for_half_bank_on_cpu() -> None:
    assert HardNegativeIndex(4, 10, dtype=torch.float16).backend_name == "torch"


# ---------------------------------------------------------------------------------------------- chunking, dtypes


@given(
    n=st.integers(1, 9),
    size=st.integers(1, 60),
    chunk=st.integers(1, 17),
    k=st.integers(1, 20),
    seed=st.integers(0, 1000),
)
@settings(max_examples=25, deadline=None)
def test_torch_chunked_equals_brute_force(n: int, size: int, chunk: int, k: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    index = HardNegativeIndex(5, 64, backend="torch", chunk_size=chunk)
    index.add(torch.randn(size, 5, generator=gen), random_tags(size, gen))
    q = torch.randn(n, 5, generator=gen)
    excl = torch.randint(0, 10, (n,), generator=gen)
    result = index.search(q, k, negatives=Select(kind=1), exclude_source=excl)
    bank, tags = bank_of(index)
    ref = brute_force(bank, tags, torch.nn.functional.normalize(q, dim=1), k, Select(kind=1), exclude_source=excl)
    assert_matches_brute_force(result, ref, k)


@pytest.mark.skipif(not HAS_FAISS, reason="faiss not installed")
@pytest.mark.parametrize("chunk", [16, 64], ids=lambda c: f"chunk{c}")
def test_faiss_blockwise_filtered_search_equals_one_block(chunk: int) -> None:
    """The FAISS CPU filtered search gathers the allowed entries block by block; the hits are those of
    one search over the whole sub-bank (same ids in the same order, same similarities), with tag
    predicates, source / image / label exclusions, over-fetch refills and fewer allowed than k."""
    size, n, dim = 300, 37, 8
    gen = torch.Generator().manual_seed(chunk)
    x, tags = torch.randn(size, dim, generator=gen), random_tags(size, gen, n_sources=40)
    whole = HardNegativeIndex(dim, size, backend="faiss")  # default block (131072 rows) holds the whole bank
    blocks = HardNegativeIndex(dim, size, backend="faiss", chunk_size=chunk)
    whole.add(x, tags)
    blocks.add(x, tags)
    q, qtags = torch.randn(n, dim, generator=gen), random_tags(n, gen, n_sources=40)
    cases = [
        (Select(kind=0), {"exclude_source": qtags.source}),
        (Select(kind=1, quality=1), {"exclude_source": qtags.source, "exclude_image": qtags.image}),
        (Select(quality=0), {"exclude_source": qtags.source, "exclude_label": qtags.label}),
        (Select(kind=1, quality=0), {}),
    ]
    for select, kwargs in cases:
        for k in (10, 200):  # 200 > the allowed entries of some rows: padded
            a = whole.search(q, k, negatives=select, **kwargs)
            b = blocks.search(q, k, negatives=select, **kwargs)
            assert torch.equal(a.indices, b.indices), (select, list(kwargs), k)
            torch.testing.assert_close(a.similarities, b.similarities, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_bank_torch(dtype: torch.dtype, device: torch.device) -> None:
    index, gen = filled_index("torch", device, n=200, capacity=256, dtype=dtype)
    q = torch.randn(9, 16, generator=gen)
    result = index.search(q.to(device), 10, negatives=Select(kind=0))
    bank, tags = bank_of(index)  # the rounded bank: similarities against it, within the query rounding
    ref = brute_force(bank, tags, torch.nn.functional.normalize(q, dim=1), 10, Select(kind=0))
    atol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    torch.testing.assert_close(result.similarities.cpu(), torch.topk(ref, 10).values.float(), atol=atol, rtol=0)
    assert (result.tags.kind == 0).all()


# ---------------------------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_cuda_equals_cpu(backend: str) -> None:
    cpu, gen = filled_index("torch", torch.device("cpu"), n=3000, capacity=4096)
    gpu = HardNegativeIndex(16, 4096, device="cuda", backend=backend)
    gpu.load_state_dict(cpu.state_dict())
    q = torch.randn(64, 16, generator=gen)
    qt = random_tags(64, gen)
    kwargs = {"negatives": Select(kind=1), "exclude_source": qt.source, "exclude_image": qt.image}
    a = cpu.search(q, 100, **kwargs)
    b = gpu.search(q.cuda(), 100, **{k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})
    torch.testing.assert_close(b.similarities.cpu(), a.similarities, atol=1e-5, rtol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not faiss_gpu_available(), reason="faiss has no GPU")
def test_faiss_gpu_over_2048_falls_back_exactly() -> None:
    index, gen = filled_index("faiss", torch.device("cuda"), n=5000, capacity=5000)
    q = torch.randn(8, 16, generator=gen).cuda()
    result = index.search(q, 3000, exclude_source=torch.zeros(8, dtype=torch.long, device="cuda"))
    bank, tags = bank_of(index)
    ref = brute_force(bank, tags, torch.nn.functional.normalize(q.cpu(), dim=1), 3000, exclude_source=torch.zeros(8))
    assert_matches_brute_force(result, ref, 3000)
