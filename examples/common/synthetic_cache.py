"""The synthetic sets of both pipelines: rendered once, in worker processes, and cached as uint8 tensors.

Each pipeline renders its train and test sets with :func:`render_train_test` (one set:
:func:`render_synthetic`), giving the function that renders one sample (a module-level function, so
that worker processes can run it). The cache file's
name holds every setting that changes its content (:func:`synthetic_cache_path`); a pipeline bumps its
``CACHE_VERSION`` when its renderer's output changes. :class:`SyntheticSetsConfig` holds the settings
both pipelines' ``data.synthetic`` sections share.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from examples.common.checkpoint import write_durably
from examples.common.config import check
from examples.common.protocol import data_draw_seeds
from examples.common.runlog import progress, show_progress
from mlcl_losses.degrade import mix_seed

__all__ = [
    "RenderSample",
    "SyntheticSetsConfig",
    "default_cache_dir",
    "degraded_copies",
    "render_cached",
    "render_in_one_thread",
    "render_synthetic",
    "render_train_test",
    "synthetic_cache_path",
    "to_uint8",
]

logger = logging.getLogger(__name__)

#: ``(n, size, seed, index, copies, severity) -> item``: renders sample ``index`` of a synthetic set of
#: ``n`` images and its ``copies`` degraded copies (at ``severity``) as a dict of uint8 tensors and numbers.
RenderSample = Callable[[int, int, int, int, int, tuple[float, float]], dict[str, Any]]


@dataclass
class SyntheticSetsConfig:
    """What both pipelines' ``data.synthetic`` sections share (each pipeline sets its own defaults).

    ``draw_per_seed``: every training seed draws its own training and test sets (data seeds
    ``seed + 2 s`` and ``seed + 2 s + 1``, :func:`examples.common.protocol.data_draw_seeds`), so
    repeats vary the data too and no image is a training image in one repeat and a test image in
    another; ``false`` keeps one draw (``seed``, ``seed + 1``) for every training seed.
    """

    n_train: int = 320
    n_test: int = 320
    seed: int = 1000
    n_view_copies: int = 2
    cache_dir: str | None = None
    workers: int = 2
    draw_per_seed: bool = True

    def validate(self, key: str) -> None:
        for name in ("n_train", "n_test", "n_view_copies", "workers"):
            check(getattr(self, name) >= 1, f"{key}.{name}", "an int >= 1", getattr(self, name))
        check(0 <= self.seed < 2**31, f"{key}.seed", "an int in [0, 2**31)", self.seed)


def default_cache_dir(pipeline: str) -> Path:
    """``$XDG_CACHE_HOME/mlcl_losses/<pipeline>`` (``~/.cache/...`` when the variable is unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mlcl_losses" / pipeline


def to_uint8(image: Tensor) -> Tensor:
    """Float image in [0, 1] -> uint8 (0..255), as the synthetic caches store it."""
    return (image.clamp(0, 1) * 255).round().to(torch.uint8)


def degraded_copies(degrade: Callable[..., Tensor], clean: Tensor, seed: int, index: int, copies: int) -> Tensor:
    """``copies`` degraded versions of ``clean`` as uint8 ``(copies, C, H, W)``, seeded by ``(seed, copy, index)``."""
    views = []
    for c in range(copies):
        g = torch.Generator().manual_seed(mix_seed(seed, 77, c, index))
        views.append(to_uint8(degrade(clean, generator=g)))
    return torch.stack(views)


def synthetic_cache_path(
    cache_dir: Path, prefix: str, n: int, size: int, seed: int, copies: int, severity: tuple[float, float], version: int
) -> Path:
    """The cache file of one synthetic set: every setting that changes its content is in the name."""
    sev = f"{severity[0]:g}-{severity[1]:g}" if copies else "none"
    return cache_dir / f"{prefix}_v{version}_n{n}_s{size}_seed{seed}_c{copies}_sev{sev}.pt"


def _ignore_sigint() -> None:
    """Rendering workers leave Ctrl-C to the parent (which stops the pool), instead of each printing a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _start_forkserver_ignoring_sigint() -> None:
    """Start the fork server with Ctrl-C ignored (inherited through its ``exec``, and by the workers it forks).

    A Ctrl-C while it imports the renderer's modules would otherwise print its own traceback; the parent,
    whose handler is restored at once, still gets the interrupt and stops the pool.
    """
    import threading
    from multiprocessing import forkserver

    if threading.current_thread() is not threading.main_thread():  # pragma: no cover - signals: main thread only
        forkserver.ensure_running()
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        forkserver.ensure_running()
    finally:
        signal.signal(signal.SIGINT, previous)


def _pool_started(ctx: Any, workers: int) -> Any:
    """A process pool whose workers ignore Ctrl-C; a Ctrl-C while they start is raised once the pool exists,
    so that leaving its ``with`` block stops them (a worker orphaned mid-start prints a traceback)."""
    import threading

    if threading.current_thread() is not threading.main_thread():  # pragma: no cover - signals: main thread only
        return ctx.Pool(workers, initializer=_ignore_sigint)
    interrupted: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, _frame: interrupted.append(signum))
    try:
        pool = ctx.Pool(workers, initializer=_ignore_sigint)
    finally:
        signal.signal(signal.SIGINT, previous)
    if interrupted:
        pool.terminate()
        raise KeyboardInterrupt
    return pool


def render_in_one_thread(job: tuple[Any, ...]) -> dict[str, Any]:
    """``job = (render, *args)``: ``render(*args)`` with one torch thread (the thread count is restored).

    One thread per rendering process; restored, as with one worker this runs in the main process.
    """
    render, *args = job
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return render(*args)
    finally:
        torch.set_num_threads(threads)


def render_synthetic(
    render: RenderSample,
    name: str,
    version: int,
    what: str,
    n: int,
    size: int,
    seed: int,
    copies: int,
    severity: tuple[float, float],
    cache_dir: Path,
    workers: int,
) -> dict[str, Any]:
    """Render (or read from the cache) ``n`` synthetic samples, stacked as by :func:`render_cached`.

    Args:
        render: renders one sample (see :data:`RenderSample`); a module-level function.
        name: the cache file's prefix (e.g. ``"fundus"``), with ``version`` its renderer's version.
        what: the images, for the progress message (e.g. ``"fundus images"``).
        n, size, seed: the synthetic set (``n`` images of ``size`` px drawn from ``seed``).
        copies, severity: degraded copies per image and their severity range (``copies=0``: none).
        cache_dir: where the cache file lives.
        workers: rendering processes.
    """
    path = synthetic_cache_path(cache_dir, name, n, size, seed, copies, severity, version)
    jobs = [(render, n, size, seed, i, copies, severity) for i in range(n)]
    desc = f"rendering {n} synthetic {what} ({size} px, cached in {cache_dir})"
    return render_cached(path, render_in_one_thread, jobs, workers, desc, preload=(render.__module__,))


def render_train_test(
    render: RenderSample,
    name: str,
    version: int,
    what: str,
    pipeline: str,
    sets: SyntheticSetsConfig,
    seed: int,
    size: int,
    severity: tuple[float, float],
) -> tuple[dict[str, Any], dict[str, Any], int]:
    """The synthetic train set (with ``sets.n_view_copies`` degraded copies) and test set of training seed ``seed``.

    The data seeds are :func:`~examples.common.protocol.data_draw_seeds`'s; the cache is
    ``sets.cache_dir`` or :func:`default_cache_dir` of ``pipeline``. ``render``, ``name``, ``version``
    and ``what`` are :func:`render_synthetic`'s.

    Returns:
        ``(train, test, train data seed)``.
    """
    cache = Path(sets.cache_dir) if sets.cache_dir else default_cache_dir(pipeline)
    train_seed, test_seed = data_draw_seeds(sets.seed, seed, sets.draw_per_seed)
    train = render_synthetic(
        render, name, version, what, sets.n_train, size, train_seed, sets.n_view_copies, severity, cache, sets.workers
    )
    test = render_synthetic(render, name, version, what, sets.n_test, size, test_seed, 0, severity, cache, sets.workers)
    return train, test, train_seed


def render_cached(
    path: Path,
    render_one: Callable[[Any], dict[str, Any]],
    jobs: Sequence[Any],
    workers: int,
    desc: str,
    listed: Sequence[str] = ("boxes",),
    preload: Sequence[str] = (),
) -> dict[str, Any]:
    """Read ``path`` (a ``torch.save`` file), or render ``render_one(job)`` for every job and cache it there.

    Items are dicts with the same keys. Tensors are stacked along a new first dimension (``view_degraded``,
    ``(copies, ...)`` per item, along dimension 1: ``(copies, N, ...)``), numbers become a tensor and the
    keys in ``listed`` (e.g. a variable number of boxes) stay lists. With ``workers > 1`` the items are
    rendered in a process pool (whose fork server imports ``render_one``'s module and the modules in
    ``preload``; the workers ignore Ctrl-C, which the parent handles). The file is written atomically and
    synced to disk (as a checkpoint is), only once every item is rendered: an interrupted rendering leaves
    no file, never a partial one; an unreadable one is rendered again.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        try:
            return torch.load(path, weights_only=True)
        except Exception as err:  # a corrupt cache file is re-rendered
            logger.warning("re-rendering unreadable cache %s (%s)", path, err)
    n = len(jobs)
    if not show_progress():  # a redirected log gets one line instead of a bar
        print(f"{desc} ...", flush=True)
    if workers > 1:
        # not fork: a process forked after torch's OpenMP pool has run (rendering a repeat's data after the
        # previous repeat trained) can hang on a lock held at the fork. A fork server is a clean process
        # (started once, with the renderer's module imported) that forks the workers quickly.
        ctx = multiprocessing.get_context("forkserver" if hasattr(os, "fork") else "spawn")
        if hasattr(os, "fork"):
            ctx.set_forkserver_preload([render_one.__module__, *preload])
            _start_forkserver_ignoring_sigint()
        with _pool_started(ctx, workers) as pool:
            items = list(progress(pool.imap(render_one, jobs, chunksize=4), desc, total=n, leave=True))
    else:
        items = [render_one(j) for j in progress(jobs, desc, leave=True)]
    data: dict[str, Any] = {}
    for key in items[0]:
        values = [it[key] for it in items]
        if key in listed:
            data[key] = values
        elif key == "view_degraded":
            data[key] = torch.stack(values, 1)  # (copies, N, C, S, S)
        elif isinstance(values[0], Tensor):
            data[key] = torch.stack(values)
        else:
            data[key] = torch.tensor(values)
    write_durably(path, lambda f: torch.save(data, f))  # as durable as a checkpoint
    return data
