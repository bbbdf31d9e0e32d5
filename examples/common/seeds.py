"""Training seeds of a command: ``--seed``, ``--seeds N`` (repeats) or ``--seed-list`` (explicit), checked.

Every repeat of a comparison is one training seed, and the seed fixes its data draw
(:func:`examples.common.protocol.data_draw_seeds`). Seeds are ints in ``[0, SEED_LIMIT)``; one command
takes at most :data:`MAX_SEEDS` of them, counted before anything is expanded or rendered.
"""

from __future__ import annotations

import re

from examples.common.config import ConfigError

__all__ = ["MAX_SEEDS", "SEED_LIMIT", "parse_seed_list", "training_seeds"]

_DIGITS = re.compile(r"[0-9]+")  # ASCII digits only (str.isdigit admits e.g. "²")
SEED_LIMIT = 2**31
"""Seeds are ints in ``[0, SEED_LIMIT)`` (every RNG of torch, NumPy and Python takes them)."""
MAX_SEEDS = 10_000
"""At most this many seeds (repeats) in one command."""


def parse_seed_list(text: str) -> list[int]:
    """Seeds of ``--seed-list``: comma-separated ints and inclusive ranges ``a-b``, each seed once, in order.

    Examples:
        >>> parse_seed_list("0-2,8,10-11")
        [0, 1, 2, 8, 10, 11]

    Raises:
        ConfigError: an empty list, a part that is not an int >= 0 or a range ``a-b`` with ``a <= b``, a seed
            of :data:`SEED_LIMIT` or more, more than :data:`MAX_SEEDS` seeds, or a seed given twice.
    """
    parts = []
    for part in (p.strip() for p in text.split(",")):
        lo, _, hi = part.partition("-")
        if not _DIGITS.fullmatch(lo) or (hi and not _DIGITS.fullmatch(hi)) or (hi and int(hi) < int(lo)):
            raise ConfigError(f"--seed-list: expected ints >= 0 and ranges a-b (a <= b), comma-separated, got {text!r}")
        if int(hi or lo) >= SEED_LIMIT:
            raise ConfigError(f"--seed-list: expected seeds below 2**31 = {SEED_LIMIT}, got {part!r} in {text!r}")
        parts.append((int(lo), int(hi or lo)))
    count = sum(hi - lo + 1 for lo, hi in parts)
    if count > MAX_SEEDS:
        raise ConfigError(f"--seed-list: expected at most {MAX_SEEDS} seeds, got {count} in {text!r}")
    seeds = [s for lo, hi in parts for s in range(lo, hi + 1)]
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seed-list: a seed is given twice in {text!r}")
    return seeds


def training_seeds(first: int, seeds: int | None, seed_list: str | None, seed_given: bool) -> list[int]:
    """The training seeds of one command, in order.

    Args:
        first: the configured seed (``run.seed``, after ``--seed``).
        seeds: ``--seeds`` (``None`` when not given: one repeat).
        seed_list: ``--seed-list`` text, or ``None``.
        seed_given: whether ``--seed`` was given.

    Returns:
        ``first, first + 1, ...`` (``seeds`` of them), or the seeds of ``seed_list``.

    Raises:
        ConfigError: ``--seed-list`` beside ``--seed`` or ``--seeds``; ``--seeds`` outside
            ``[1, MAX_SEEDS]`` or running past ``SEED_LIMIT``; a bad ``--seed-list`` (:func:`parse_seed_list`).
    """
    if seed_list is not None:
        if seed_given or seeds is not None:
            raise ConfigError("--seed-list replaces --seed and --seeds: give one or the other")
        return parse_seed_list(seed_list)
    count = 1 if seeds is None else seeds
    if not 1 <= count <= MAX_SEEDS or first + count > SEED_LIMIT:
        raise ConfigError(
            f"--seeds: expected an int in [1, {MAX_SEEDS}] with the last seed (run.seed {first} + "
            f"--seeds - 1) below 2**31, got {count}"
        )
    return [first + i for i in range(count)]
