"""Typed configuration of the example pipelines: dataclasses, YAML files and ``--set key=value`` overrides.

A pipeline's configuration is a tree of dataclasses. :func:`load_config` reads a YAML file into it,
applies command-line overrides (``pretrain.epochs=3``, ``model.arch=resnet50``; values are parsed as
YAML, so ``3``, ``0.1``, ``true``, ``null`` and ``[0.3, 1.0]`` have their natural types) and checks
every value against the field's type and the section's ``validate()``. Every error names the key,
the expectation and the value (and, for an unknown key, the nearest known ones)::

    ConfigError: pretrain.epoch: unknown key (did you mean 'epochs'?)
    ConfigError: finetune.optim.lr: expected a number > 0, got -0.1

Only example scripts read configurations; the library takes typed keyword arguments.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, get_args, get_origin

from examples.common.yaml_files import safe_load_unique

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

__all__ = [
    "ConfigError",
    "ModelConfig",
    "OptimConfig",
    "QUALITY_KEYS",
    "PretrainConfig",
    "FinetuneConfig",
    "LevelWeights",
    "SelfPacedConfig",
    "apply_overrides",
    "check",
    "config_to_dict",
    "from_dict",
    "load_config",
]

T = TypeVar("T", bound="DataclassInstance")  # a configuration section: a dataclass


class ConfigError(ValueError):
    """A configuration file, key or value is wrong; the message says which and why."""


def check(condition: bool, key: str, expectation: str, value: Any) -> None:
    """Raise :class:`ConfigError` ``"<key>: expected <expectation>, got <value>"`` unless ``condition``."""
    if not condition:
        raise ConfigError(f"{key}: expected {expectation}, got {value!r}")


# --------------------------------------------------------------------------------------------------
# sections shared by the pipelines
# --------------------------------------------------------------------------------------------------

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "constant")
REGULARIZERS = ("hard", "linear", "log", "mixture")
PACES = ("constant", "linear", "exponential", "quantile")
#: Image-quality groups of both pipelines (EyeQ's grading; simulated for ChestX-ray14), lower case.
QUALITY_KEYS = ("good", "usable", "reject")


@dataclass
class ModelConfig:
    """Encoder and projection head.

    ``arch`` is a torchvision ResNet (``resnet18``, ``resnet34``, ``resnet50``) or any timm model
    as ``timm:<name>`` (e.g. ``timm:resnet50``, ``timm:convnext_tiny``, ``timm:efficientnet_b0``).
    ``width`` scales the channels of every torchvision ResNet stage (1.0 is torchvision's network;
    0.25 gives 16-32-64-128 channels for ResNet-18); it must stay 1.0 with a timm model.
    ``weights`` is a local file holding a ``state_dict`` of the encoder (torchvision or timm key
    names, matching ``arch``, e.g. ImageNet weights downloaded beforehand); ``null`` is random
    initialisation. The projection head's input is the backbone's feature dimension.
    """

    arch: str = "resnet18"
    width: float = 1.0
    weights: str | None = None
    proj_hidden: int = 512
    proj_dim: int = 128

    def validate(self, key: str) -> None:
        from examples.common.models import TIMM_PREFIX, arch_problem

        problem = arch_problem(self.arch)
        check(problem is None, f"{key}.arch", str(problem), self.arch)
        check(0 < self.width <= 4, f"{key}.width", "a number in (0, 4]", self.width)
        check(
            self.width == 1.0 or not self.arch.startswith(TIMM_PREFIX),
            f"{key}.width",
            "1.0 with a timm backbone (width scales torchvision ResNets only; choose a smaller timm model)",
            self.width,
        )
        check(self.proj_hidden >= 1, f"{key}.proj_hidden", "an int >= 1", self.proj_hidden)
        check(self.proj_dim >= 1, f"{key}.proj_dim", "an int >= 1", self.proj_dim)


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule (stepped once per batch)."""

    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.02
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_epochs: float = 0.0

    def validate(self, key: str) -> None:
        check(self.name in OPTIMIZERS, f"{key}.name", f"one of {OPTIMIZERS}", self.name)
        check(self.lr > 0, f"{key}.lr", "a number > 0", self.lr)
        check(0 <= self.momentum < 1, f"{key}.momentum", "a number in [0, 1)", self.momentum)
        check(self.weight_decay >= 0, f"{key}.weight_decay", "a number >= 0", self.weight_decay)
        check(self.schedule in SCHEDULES, f"{key}.schedule", f"one of {SCHEDULES}", self.schedule)
        check(self.warmup_epochs >= 0, f"{key}.warmup_epochs", "a number >= 0", self.warmup_epochs)
        check(
            not (self.nesterov and self.name == "sgd" and self.momentum == 0),
            f"{key}.nesterov",
            "false when momentum is 0 (Nesterov needs momentum)",
            self.nesterov,
        )


@dataclass
class LevelWeights:
    """Weights of the three CoMCL levels (:func:`mlcl_losses.comcl_levels`); 0 drops a level."""

    lesion: float = 1.0
    quality: float = 1.0
    healthy: float = 1.0

    def validate(self, key: str) -> None:
        for name in ("lesion", "quality", "healthy"):
            value = getattr(self, name)
            check(value >= 0, f"{key}.{name}", "a number >= 0", value)
        check(self.lesion + self.quality + self.healthy > 0, key, "at least one weight > 0", dataclasses.asdict(self))


@dataclass
class SelfPacedConfig:
    """Self-paced weighting of negatives (:class:`mlcl_losses.SelfPacedWeighting`).

    The pace goes from ``start`` to ``end`` over ``ramp`` (a fraction of the pre-training steps).
    ``levels`` names the CoMCL levels whose negatives are weighted (the others are not).
    For ``pace: quantile`` ``start``/``end`` are the fractions of candidates admitted.
    """

    enabled: bool = True
    regularizer: Literal["hard", "linear", "log", "mixture"] = "hard"
    pace: Literal["constant", "linear", "exponential", "quantile"] = "quantile"
    start: float = 0.8
    end: float = 1.0
    ramp: float = 1.0
    levels: list[str] = field(default_factory=lambda: ["lesion", "quality", "healthy"])

    def validate(self, key: str) -> None:
        check(self.regularizer in REGULARIZERS, f"{key}.regularizer", f"one of {REGULARIZERS}", self.regularizer)
        check(self.pace in PACES, f"{key}.pace", f"one of {PACES}", self.pace)
        check(self.start > 0, f"{key}.start", "a number > 0", self.start)
        check(self.end > 0, f"{key}.end", "a number > 0", self.end)
        check(0 < self.ramp <= 1, f"{key}.ramp", "a fraction in (0, 1]", self.ramp)
        allowed = ("lesion", "quality", "healthy")
        check(
            len(self.levels) > 0 and all(x in allowed for x in self.levels),
            f"{key}.levels",
            f"a non-empty list of level names from {allowed}",
            self.levels,
        )
        if self.pace == "quantile":
            check(
                self.start <= 1 and self.end <= 1,
                f"{key}.start/end",
                "fractions in (0, 1] for pace quantile",
                (self.start, self.end),
            )


@dataclass
class PretrainConfig:
    """Contrastive pre-training on four-view patches.

    ``batch_images`` images per step; each gives up to ``max_lesions`` lesion boxes (3 views each) and
    ``n_healthy`` healthy patches (2 views each). ``bank_size`` keys of the momentum encoder fill the
    hard-negative index; each anchor gets its ``k`` hardest allowed bank negatives per level.
    """

    epochs: int = 10
    batch_images: int = 32
    patch_size: int = 128
    n_healthy: int = 4
    max_lesions: int = 8
    temperature: float = 0.07
    key_momentum: float = 0.99
    bank_size: int = 16384
    k: int = 64
    index_backend: Literal["auto", "torch", "faiss"] = "auto"
    loss_impl: Literal["auto", "fused", "reference"] = "auto"
    degradation_severity: tuple[float, float] = (0.3, 1.0)
    levels: LevelWeights = field(default_factory=LevelWeights)
    self_paced: SelfPacedConfig = field(default_factory=SelfPacedConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def validate(self, key: str) -> None:
        check(self.epochs >= 0, f"{key}.epochs", "an int >= 0", self.epochs)
        for name in ("batch_images", "patch_size", "max_lesions", "bank_size", "k"):
            check(getattr(self, name) >= 1, f"{key}.{name}", "an int >= 1", getattr(self, name))
        check(self.n_healthy >= 0, f"{key}.n_healthy", "an int >= 0", self.n_healthy)
        check(self.temperature > 0, f"{key}.temperature", "a number > 0", self.temperature)
        check(0 <= self.key_momentum < 1, f"{key}.key_momentum", "a number in [0, 1)", self.key_momentum)
        check(
            self.index_backend in ("auto", "torch", "faiss"),
            f"{key}.index_backend",
            "one of auto, torch, faiss",
            self.index_backend,
        )
        check(
            self.loss_impl in ("auto", "fused", "reference"),
            f"{key}.loss_impl",
            "one of auto, fused, reference",
            self.loss_impl,
        )
        check(self.k <= self.bank_size, f"{key}.k", f"<= bank_size ({self.bank_size})", self.k)
        lo, hi = self.degradation_severity
        check(0 <= lo <= hi <= 1, f"{key}.degradation_severity", "[low, high] with 0 <= low <= high <= 1", [lo, hi])
        self.levels.validate(f"{key}.levels")
        self.self_paced.validate(f"{key}.self_paced")
        self.optim.validate(f"{key}.optim")


@dataclass
class FinetuneConfig:
    """Supervised fine-tuning of encoder + linear classifier on whole images.

    ``freeze_epochs``: the first epochs train the classifier only, on frozen encoder features
    (BatchNorm statistics frozen too), then everything (linear probing, then fine-tuning).

    The labelled subset (the two axes of the label-scarce protocol): fine-tuning uses the labels of
    ``label_fraction`` of the training images whose quality is in ``label_qualities`` (``null``: every
    quality), drawn stratified by class from the training seed, so every method of a repeat gets the same
    subset; ``1.0`` with ``[good]`` means every Good image. Pre-training always uses every training image.
    """

    epochs: int = 20
    batch_size: int = 32
    freeze_epochs: int = 0
    label_smoothing: float = 0.0
    augment: bool = True
    label_fraction: float = 1.0
    label_qualities: list[str] | None = None
    optim: OptimConfig = field(default_factory=OptimConfig)

    def validate(self, key: str) -> None:
        check(self.epochs >= 1, f"{key}.epochs", "an int >= 1", self.epochs)
        check(self.batch_size >= 1, f"{key}.batch_size", "an int >= 1", self.batch_size)
        check(
            0 <= self.freeze_epochs < self.epochs,
            f"{key}.freeze_epochs",
            f"an int in [0, epochs={self.epochs})",
            self.freeze_epochs,
        )
        check(0 <= self.label_smoothing < 1, f"{key}.label_smoothing", "a number in [0, 1)", self.label_smoothing)
        check(0 < self.label_fraction <= 1, f"{key}.label_fraction", "a fraction in (0, 1]", self.label_fraction)
        if self.label_qualities is not None:
            check(
                len(self.label_qualities) > 0
                and len(set(self.label_qualities)) == len(self.label_qualities)
                and all(q in QUALITY_KEYS for q in self.label_qualities),
                f"{key}.label_qualities",
                f"null or a non-empty list of distinct names from {QUALITY_KEYS}",
                self.label_qualities,
            )
        self.optim.validate(f"{key}.optim")


# --------------------------------------------------------------------------------------------------
# generic machinery
# --------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    if origin is tuple:
        return f"a list of {len(get_args(tp))} values"
    return {bool: "true/false", int: "an int", float: "a number", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert it (int -> float, list -> tuple)."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(err)
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        check(value is None, key, "null", value)
        return None
    if origin is Literal:
        check(value in get_args(tp), key, _type_name(tp), value)
        return value
    if origin is tuple:
        args = get_args(tp)
        check(isinstance(value, (list, tuple)) and len(value) == len(args), key, _type_name(tp), value)
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if origin is list:
        (arg,) = get_args(tp)
        check(isinstance(value, (list, tuple)), key, "a list", value)
        return [_coerce(v, arg, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        check(isinstance(value, bool), key, "true/false", value)
        return value
    if tp is int:
        check(isinstance(value, int) and not isinstance(value, bool), key, "an int", value)
        return value
    if tp is float:
        check(isinstance(value, (int, float)) and not isinstance(value, bool), key, "a number", value)
        try:
            number = float(value)
        except OverflowError:  # an int beyond float's range
            number = math.inf
        check(math.isfinite(number), key, "a finite number (not nan or inf)", value)
        return number
    if tp is str:
        check(isinstance(value, str), key, "a string", value)
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):  # the class, not an instance
        return from_dict(tp, value, key)
    raise ConfigError(f"{key}: unsupported field type {tp!r}")  # pragma: no cover - a bug in a config class


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unknown(key: str, name: str, known: Sequence[str]) -> ConfigError:
    close = difflib.get_close_matches(name, known, n=2)
    hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else f" (known: {', '.join(known)})"
    return ConfigError(f"{key}: unknown key{hint}")


def from_dict(cls: type[T], data: Any, key: str = "") -> T:
    """Build dataclass ``cls`` from a mapping; missing keys keep their defaults."""
    where = key or "config"
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping of keys to values, got {data!r}")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for name, value in data.items():
        sub = f"{key}.{name}" if key else str(name)
        if name not in names:
            raise _unknown(sub, str(name), names)
        kwargs[name] = _coerce(value, hints[name], sub)
    return cls(**kwargs)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config (tuples as lists), ready for YAML or JSON."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def _set_path(tree: dict[str, Any], dotted: str, value: Any, cls: type) -> None:
    parts = dotted.split(".")
    node, node_cls = tree, cls
    for i, part in enumerate(parts):
        key = ".".join(parts[: i + 1])
        names = [f.name for f in dataclasses.fields(node_cls)]
        if part not in names:
            raise _unknown(key, part, names)
        if i == len(parts) - 1:
            node[part] = value
            return
        sub_cls = _hints(node_cls)[part]
        if not (isinstance(sub_cls, type) and dataclasses.is_dataclass(sub_cls)):
            raise ConfigError(f"{key}: is a value, not a section; cannot set {dotted!r}")
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node, node_cls = child, sub_cls


def apply_overrides(tree: dict[str, Any], overrides: Sequence[str], cls: type) -> dict[str, Any]:
    """Apply ``key=value`` strings (values parsed as YAML) to a raw config tree."""
    import yaml

    given: dict[str, str] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. pretrain.epochs=3")
        dotted, raw = item.split("=", 1)
        dotted = dotted.strip()
        if not dotted:
            raise ConfigError(f"override {item!r}: empty key")
        try:
            value = safe_load_unique(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({err})") from err
        if dotted in given:
            raise ConfigError(f"--set {dotted}: given twice ({given[dotted]!r} and {item!r}); one key, one value")
        given[dotted] = item
        _set_path(tree, dotted, value, cls)
    return tree


def load_config(cls: type[T], path: str | os.PathLike[str] | None = None, overrides: Sequence[str] = ()) -> T:
    """Read a YAML config file into ``cls``, apply overrides and validate.

    Args:
        cls: the top-level config dataclass; it may define ``validate()``.
        path: YAML file; ``None`` starts from the defaults.
        overrides: ``key=value`` strings.

    Raises:
        ConfigError: a missing or unreadable file, invalid YAML (a key written twice in one mapping
            among it), an unknown key or a bad value.
    """
    import yaml

    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(
                f"config file {str(p)!r} does not exist" if not p.exists() else f"config {str(p)!r} is not a file"
            )
        try:
            loaded = safe_load_unique(p.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise ConfigError(f"{p}: not valid YAML ({err})") from err
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping of sections at the top level, got {type(loaded).__name__}")
        tree = loaded or {}
    tree = apply_overrides(tree, overrides, cls)
    try:
        cfg = from_dict(cls, tree)
    except ConfigError as err:
        key = str(err).split(":", 1)[0]
        given = [o for o in overrides if o.split("=", 1)[0].strip() == key]
        if given:  # the bad value came from the command line, not from the file
            raise ConfigError(f"--set {given[-1]}: {err}") from None
        raise ConfigError(f"{path}: {err}" if path is not None else str(err)) from None
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        validate()
    return cfg
