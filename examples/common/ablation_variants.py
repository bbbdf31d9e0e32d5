"""Ablation variants: the variants file, and the checks of a run's every variant before anything runs.

See :mod:`examples.common.ablation` (the runner and the aggregation, which re-exports these names).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from examples.common.config import ConfigError, load_config
from examples.common.yaml_files import safe_load_unique

__all__ = ["METHOD", "REFERENCE", "Variant", "check_run", "load_variants", "train_script"]

REPO = Path(__file__).resolve().parents[2]
REFERENCE = "default"
METHOD = "comcl"
_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]*")


@dataclass(frozen=True)
class Variant:
    """One ablation variant: a folder name, a label for tables and its ``--set KEY=VALUE`` overrides.

    ``method`` names a method of the reference comparison whose runs *are* this variant (e.g.
    ``comcl_no_spl``): nothing is run for it, its repeats are read from the reference.
    """

    name: str
    label: str
    overrides: tuple[str, ...]
    method: str | None = None

    @property
    def keys(self) -> tuple[str, ...]:
        """The configuration keys the variant sets."""
        return tuple(o.split("=", 1)[0].strip() for o in self.overrides)


def load_variants(path: str | Path) -> dict[str, Variant]:
    """The variants of a YAML file (name -> ``{label: str, set: [KEY=VALUE, ...]}``), ``default`` first.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: not valid YAML (a variant or key written twice among it), not a mapping, a name
            that is not a folder-safe lower-case word, an entry without a string ``label`` or with
            ``set`` not a list of ``KEY=VALUE`` strings, no ``default`` entry, a ``default`` that sets
            anything, or two variants with the same overrides.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--variants: {str(p)!r} is not a file")
    try:
        raw = safe_load_unique(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ValueError(f"--variants: {p} is not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{p}: expected a mapping of variant name -> {{label, set}}, but got {type(raw).__name__}")
    variants: dict[str, Variant] = {}
    for name, entry in raw.items():
        where = f"{p}: variant {name!r}"
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(f"{where}: expected a name of lower-case letters, digits, '_', '.', '-'")
        if (
            not isinstance(entry, dict)
            or set(entry) - {"label", "set", "method"}
            or not isinstance(entry.get("label"), str)
        ):
            raise ValueError(f"{where}: expected {{label: str, set: [KEY=VALUE, ...]}}, but got {entry!r}")
        sets = entry.get("set", [])
        if not isinstance(sets, list) or not all(isinstance(s, str) and "=" in s for s in sets):
            raise ValueError(f"{where}: expected `set` to be a list of 'KEY=VALUE' strings, but got {sets!r}")
        method = entry.get("method")
        if method is not None and (not isinstance(method, str) or sets or method == METHOD):
            raise ValueError(f"{where}: `method` names another method of the reference comparison, without `set`")
        variants[name] = Variant(name, entry["label"], tuple(sets), method)
    if REFERENCE not in variants:
        raise ValueError(f"{p}: expected a {REFERENCE!r} variant (the reference, with `set: []`)")
    if variants[REFERENCE].overrides:
        raise ValueError(
            f"{p}: the {REFERENCE!r} variant is the reference and sets nothing, got {variants[REFERENCE].overrides}"
        )
    seen: dict[tuple[str, ...], str] = {}
    for v in variants.values():
        key = (v.method or "", *sorted("=".join(part.strip() for part in o.split("=", 1)) for o in v.overrides))
        if key in seen:
            raise ValueError(f"{p}: variants {seen[key]!r} and {v.name!r} set the same overrides {list(key[1:])}")
        seen[key] = v.name
    return {REFERENCE: variants[REFERENCE]} | {k: v for k, v in variants.items() if k != REFERENCE}


def train_script(pipeline: str) -> Path:
    """``examples/<pipeline>/train.py``; ``ValueError`` naming ``pipeline`` if there is none."""
    train = REPO / "examples" / pipeline / "train.py"
    if not _NAME.fullmatch(pipeline) or not train.is_file():
        raise ValueError(f"`pipeline`: expected a folder of examples/ with a train.py, but got {pipeline!r}")
    return train


def check_run(
    pipeline: str,
    config: Path,
    variants: dict[str, Variant],
    seed: int,
    out: Path,
    sets: Sequence[str] = (),
    jobs: int = 1,
    reference_methods: Collection[str] | None = None,
) -> None:
    """Everything ``run`` would otherwise find out only in a variant's subprocess, before anything runs.

    Every variant's configuration is loaded in-process as its run would load it (the pipeline's
    configuration class, ``config``, then ``sets``, then the variant's overrides), so an unknown key or
    a bad value stops the command before the reference has trained. ``reference_methods``: the
    methods of the ``--reference`` comparison (``None``: no reference; the default is run).

    Raises:
        ValueError: an unknown ``pipeline``; ``jobs`` < 1; ``seed`` < 0; ``out`` (or a folder above it)
            not a directory; a ``method:`` variant without ``reference``, or whose method the
            reference has not run; a configuration error of a variant (named, with its overrides).
    """
    train_script(pipeline)
    if jobs < 1:
        raise ValueError(f"--jobs: expected an int >= 1 (variants run at once), but got {jobs}")
    if seed < 0:
        raise ValueError(f"--seed: expected an int >= 0 (the first training seed), but got {seed}")
    for part in (out, *out.parents):
        if part.exists() and not part.is_dir():
            raise ValueError(f"--out: expected a directory, but {part} is not one")
    for v in variants.values():
        if v.method is not None and reference_methods is None:
            raise ValueError(
                f"variant {v.name!r} (method: {v.method}) is read from a finished comparison: pass --reference"
            )
        if v.method is not None and reference_methods is not None and v.method not in reference_methods:
            raise ValueError(
                f"variant {v.name!r}: expected the --reference comparison to have {v.method!r} runs, "
                f"but it has {sorted(reference_methods)}"
            )
    config_cls = importlib.import_module(f"examples.{pipeline}.train").CLI.config_cls
    for v in variants.values():
        if v.method is not None or (reference_methods is not None and v.name == REFERENCE):
            continue  # nothing is run for it
        try:
            load_config(config_cls, config, [*sets, *v.overrides])
        except ConfigError as err:
            given = " ".join(f"--set {o}" for o in [*sets, *v.overrides]) or "no overrides"
            raise ValueError(f"variant {v.name!r} ({given}): {err}") from None
