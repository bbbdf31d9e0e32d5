"""Tests of the shared example code: config, checkpoint, evaluation, comparison, models."""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from examples.common.checkpoint import load_checkpoint, save_checkpoint, set_rng_state
from examples.common.compare import aggregate, markdown_table, plot_groups
from examples.common.config import (
    ConfigError,
    FinetuneConfig,
    ModelConfig,
    OptimConfig,
    PretrainConfig,
    config_to_dict,
    load_config,
)
from examples.common.evaluate import classification_metrics, grouped_metrics
from examples.common.models import (
    Classifier,
    ContrastiveModel,
    build_encoder,
    feature_dim,
    momentum_copy,
    momentum_update,
)
from examples.common.runlog import RunLogger, write_json
from examples.common.yaml_files import DuplicateKeyError, safe_load_unique


@dataclass
class _Cfg:
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def validate(self) -> None:
        self.model.validate("model")
        self.pretrain.validate("pretrain")
        self.finetune.validate("finetune")


# ---------------------------------------------------------------- config


def test_config_yaml_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model: {arch: resnet50, width: 1}\npretrain:\n  degradation_severity: [0.2, 0.9]\n")
    cfg = load_config(
        _Cfg, path, ["pretrain.epochs=3", "finetune.optim.lr=0.1", "pretrain.levels.quality=0", "model.weights=null"]
    )
    assert cfg.model.arch == "resnet50"
    assert cfg.model.width == 1.0
    assert isinstance(cfg.model.width, float)
    assert cfg.pretrain.degradation_severity == (0.2, 0.9)
    assert cfg.pretrain.epochs == 3
    assert cfg.finetune.optim.lr == 0.1
    assert cfg.pretrain.levels.quality == 0.0
    assert config_to_dict(cfg)["pretrain"]["degradation_severity"] == [0.2, 0.9]


@pytest.mark.parametrize(
    ("text", "overrides", "match"),
    [
        ("pretrain: {epoch: 3}\n", [], r"pretrain\.epoch: unknown key \(did you mean 'epochs'"),
        ("", ["pretrain.epochs=three"], r"pretrain\.epochs: expected an int, got 'three'"),
        ("", ["finetune.optim.lr=-0.1"], r"finetune\.optim\.lr: expected a number > 0, got -0\.1"),
        ("", ["model.arch=vgg"], r"model\.arch: expected one of"),
        ("", ["pretrain.epochs"], r"expected key=value"),
        ("", ["pretrain.epochs.x=1"], r"is a value, not a section"),
        ("", ["nosuch.key=1"], r"nosuch: unknown key"),
        ("", ["pretrain.degradation_severity=[0.9, 0.1]"], r"degradation_severity: expected \[low, high\]"),
        ("", ["pretrain.k=100000"], r"pretrain\.k: expected <= bank_size"),
        ("model: [1, 2]\n", [], r"model: expected a mapping"),
        ("- a\n- b\n", [], r"expected a mapping of sections"),
        ("model: {arch: resnet18\n", [], r"not valid YAML"),
        ("pretrain:\n  epochs: 3\n  lr: 0.1\n  epochs: 30\n", [], r"key 'epochs' appears twice.*lines 2 and 4"),
        ("pretrain: {epochs: 3}\nmodel: {}\npretrain: {}\n", [], r"not valid YAML.*key 'pretrain' appears twice"),
    ],
    ids=[
        "unknown-key",
        "bad-type",
        "bad-value",
        "bad-choice",
        "no-equals",
        "not-section",
        "unknown-section",
        "bad-range",
        "k-gt-bank",
        "section-not-mapping",
        "top-not-mapping",
        "malformed-yaml",
        "duplicate-key",
        "duplicate-section",
    ],
)
def test_config_errors(tmp_path: Path, text: str, overrides: list[str], match: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(_Cfg, path, overrides)


def test_yaml_duplicate_keys_refused_merge_keys_kept() -> None:
    with pytest.raises(DuplicateKeyError, match=r"key 'a' appears twice in one mapping \(lines 3 and 4\)"):
        safe_load_unique("top:\n  - {b: 1}\n  - a: 1\n    a: 2\n")
    # the same key in different mappings, and a merge key overridden, are plain YAML
    assert safe_load_unique("x: {a: 1}\ny: {a: 2}\n") == {"x": {"a": 1}, "y": {"a": 2}}
    assert safe_load_unique("base: &b {a: 1, c: 3}\nx:\n  <<: *b\n  a: 2\n")["x"] == {"a": 2, "c": 3}
    assert safe_load_unique("") is None


def test_exponent_without_a_dot_is_a_number(tmp_path: Path) -> None:
    """PyYAML (YAML 1.1) reads 1e-3 as a string; the examples read it as a float, in files and in --set."""
    assert safe_load_unique("[1e-3, -2E+4, 12, 1.5, '1e-3', 1e3x]") == [0.001, -20000.0, 12, 1.5, "1e-3", "1e3x"]
    path = tmp_path / "c.yaml"
    path.write_text("pretrain: {temperature: 5e-1}\n")
    cfg = load_config(_Cfg, path, ["finetune.optim.lr=1e-3"])
    assert cfg.pretrain.temperature == 0.5
    assert cfg.finetune.optim.lr == 0.001


def test_config_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(_Cfg, tmp_path / "nope.yaml")


def test_optim_nesterov_needs_momentum() -> None:
    with pytest.raises(ConfigError, match="nesterov"):
        OptimConfig(momentum=0.0, nesterov=True).validate("o")


# ---------------------------------------------------------------- checkpoint and logs


def test_checkpoint_roundtrip_and_rng(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "ckpt.pt"
    torch.manual_seed(3)
    random.seed(3)
    save_checkpoint(path, {"model": {"w": torch.arange(3.0)}, "epoch": 2})
    save_checkpoint(path, {"model": {"w": torch.arange(4.0)}, "epoch": 3})  # overwrite
    assert sorted(p.name for p in path.parent.iterdir()) == ["ckpt.pt"]  # no temporary left
    state = load_checkpoint(path)
    assert state["epoch"] == 3
    torch.testing.assert_close(state["model"]["w"], torch.arange(4.0))
    set_rng_state(state["rng"])
    got = (torch.rand(2), random.random())
    set_rng_state(state["rng"])
    assert torch.equal(torch.rand(2), got[0])
    assert random.random() == got[1]


def test_runlog_csv_and_json(tmp_path: Path) -> None:
    log = RunLogger(tmp_path, tensorboard=True)
    log.scalars("pretrain", 0, 5, {"loss": 1.5})
    log.scalars("pretrain", 1, 10, {"loss": 1.0})
    log.truncate(lambda stage, epoch: epoch < 1)
    log.close()
    rows = (tmp_path / "scalars.csv").read_text().splitlines()
    assert rows == ["stage,epoch,step,name,value", "pretrain,0,5,loss,1.5"]
    assert any((tmp_path / "tensorboard").iterdir())
    write_json(tmp_path / "m.json", {"a": float("nan"), "b": torch.tensor(2.0)})
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": None, "b": 2.0}


# ---------------------------------------------------------------- evaluation


def test_classification_metrics_perfect_and_grouped() -> None:
    target = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    probs = torch.nn.functional.one_hot(target, 5).float() * 0.9 + 0.02
    m = classification_metrics(probs, target, 5)
    assert m["accuracy"] == 1.0
    assert m["kappa"] == pytest.approx(1.0)
    assert m["macro_f1"] == 1.0
    assert m["auc"] == 1.0
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    g = grouped_metrics(probs, target, groups, ["Good", "Usable", "Reject"], 5)
    assert set(g["per_quality"]) == {"good", "usable", "reject"}
    assert g["per_quality"]["reject"]["n"] == 2
    # AUC over the classes present in the group only (classes 1 and 2 here)
    assert g["per_quality"]["reject"]["auc"] == 1.0


def test_classification_metrics_quadratic_kappa_penalises_distance() -> None:
    target = torch.tensor([0, 1, 2, 3, 4] * 4)
    near = torch.nn.functional.one_hot((target + 1).clamp(max=4), 5).float()
    far = torch.nn.functional.one_hot((4 - target), 5).float()
    assert classification_metrics(near, target, 5)["kappa"] > classification_metrics(far, target, 5)["kappa"]


def test_classification_metrics_empty() -> None:
    m = classification_metrics(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long), 5)
    assert m["n"] == 0
    assert math.isnan(m["kappa"])


# ---------------------------------------------------------------- comparison


def _fake_run(seed: int, k: float) -> dict:
    q = {
        g: {"accuracy": k, "kappa": k - d, "macro_f1": k, "auc": k}
        for g, d in (("good", 0.0), ("usable", 0.1), ("reject", 0.2))
    }
    return {"accuracy": k, "kappa": k, "macro_f1": k, "auc": k, "per_quality": q, "seed": seed}


def test_compare_aggregate_table_plot(tmp_path: Path) -> None:
    groups = ["good", "usable", "reject"]
    results = {
        "ce": aggregate([_fake_run(0, 0.5), _fake_run(1, 0.7)], groups),
        "comcl": aggregate([_fake_run(0, 0.8), _fake_run(1, 0.8)], groups),
    }
    assert results["ce"]["kappa"] == pytest.approx(0.6)
    assert results["ce"]["std"]["kappa"] == pytest.approx(0.1414, abs=1e-3)
    assert results["comcl"]["kappa_drop"] == pytest.approx(0.2)
    table = markdown_table(results, groups)
    assert "CoMCL (full)" in table
    assert "0.600 ± 0.141" in table
    plot_groups(results, groups, tmp_path / "k.png")
    assert (tmp_path / "k.png").stat().st_size > 1000


# ---------------------------------------------------------------- models


@pytest.mark.parametrize(
    ("arch", "width", "dim"), [("resnet18", 0.25, 128), ("resnet18", 1.0, 512), ("resnet50", 0.25, 512)]
)
def test_encoder_width(arch: str, width: float, dim: int) -> None:
    enc = build_encoder(arch, width)
    assert enc.out_dim == dim
    assert enc(torch.rand(2, 3, 32, 32)).shape == (2, dim)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_full_width_out_dim_is_torchvisions_fc_input(arch: str) -> None:
    import torchvision

    assert build_encoder(arch, 1.0).out_dim == getattr(torchvision.models, arch)().fc.in_features


def test_feature_dim_needs_an_int_out_dim() -> None:
    assert feature_dim(build_encoder("resnet18", 0.25)) == 128
    with pytest.raises(TypeError, match=r"Expected `encoder` to have an int `out_dim`.*Linear has None"):
        ContrastiveModel(torch.nn.Linear(4, 4), proj_hidden=8, proj_dim=4)
    with pytest.raises(TypeError, match=r"`out_dim`.*Linear has None"):
        Classifier(torch.nn.Linear(4, 4), 3)


def test_encoder_weights_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    src = build_encoder("resnet18", 0.25)
    path = tmp_path / "w.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, path)
    loaded = build_encoder("resnet18", 0.25, path)
    for a, b in zip(src.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="does not exist"):
        build_encoder("resnet18", 0.25, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="do not fit resnet18 at width 0.5"):
        build_encoder("resnet18", 0.5, path)


def test_momentum_update_and_classifier() -> None:
    enc = build_encoder("resnet18", 0.125)
    key = momentum_copy(enc)
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(1.0)
    before = next(key.parameters()).clone()
    momentum_update(key, enc, 0.9)
    after = next(key.parameters())
    torch.testing.assert_close(after, 0.9 * before + 0.1 * next(enc.parameters()))
    assert not any(p.requires_grad for p in key.parameters())
    assert Classifier(enc, 5)(torch.rand(2, 3, 32, 32)).shape == (2, 5)
