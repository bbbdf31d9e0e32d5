"""timm backbones in the example pipelines (examples/common/models.py): build, weights, config, pre-training step."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import timm
import torch
from examples.chestxray.data import build_data
from examples.chestxray.train import ChestXrayConfig
from examples.common.config import ConfigError, load_config
from examples.common.models import ContrastiveModel, build_encoder, check_input_sizes
from examples.common.pretrain import build_pretrain, pretrain_epoch
from torch.utils.data import DataLoader

from mlcl_losses.views import collate_four_views

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "examples" / "chestxray" / "configs" / "tiny.yaml"
# timm's own test-sized models of two families (a ResNet and an EfficientNet), so CPU tests stay fast
SMALL_TIMM = ["test_resnet", "test_efficientnet"]


@pytest.mark.parametrize(
    ("name", "dim"),
    [("test_resnet", 96), ("test_efficientnet", 256), ("mobilenetv3_small_050", 1024)],
    ids=["resnet", "efficientnet", "mobilenetv3-pre-logits"],  # MobileNetV3: 288 channels, then a 1024 layer
)
def test_timm_encoder_and_head_size(name: str, dim: int) -> None:
    encoder = build_encoder(f"timm:{name}")
    assert encoder.out_dim == dim
    assert encoder.eval()(torch.rand(2, 3, 32, 32)).shape == (2, dim)
    model = ContrastiveModel(encoder, proj_hidden=16, proj_dim=8)
    assert model.head.net[0].in_features == dim
    assert model(torch.rand(3, 3, 32, 32)).shape == (3, 8)


@pytest.mark.parametrize("name", SMALL_TIMM)
def test_timm_in_the_chestxray_pretraining_step(name: str, cache_dir: Path) -> None:
    """One CoMCL step of the pipeline (tiny ChestX-ray config) with a timm backbone: forward, backward, update."""
    cfg = load_config(
        ChestXrayConfig,
        TINY,
        [f"model.arch=timm:{name}", "model.width=1.0", f"data.synthetic.cache_dir={cache_dir}"],
    )
    data = build_data(cfg, seed=0)
    data.views.set_epoch(0)
    batch = next(iter(DataLoader(data.views, batch_size=cfg.pretrain.batch_images, collate_fn=collate_four_views)))
    views, tags = batch
    # the ChestX-ray input rule is the same for both backbone families: grayscale repeated to 3 channels
    assert views.shape[1] == 3
    torch.testing.assert_close(views[:, 0], views[:, 2], rtol=0, atol=0)

    torch.manual_seed(0)
    encoder = build_encoder(cfg.model.arch, cfg.model.width, cfg.model.weights)
    model = ContrastiveModel(encoder, cfg.model.proj_hidden, cfg.model.proj_dim)
    assert model.head.net[0].in_features == timm.create_model(name, num_classes=0).head_hidden_size
    state = build_pretrain("comcl", model, cfg.pretrain, cfg.model.proj_dim, 1, torch.device("cpu"))
    before = [p.detach().clone() for p in encoder.parameters()]
    stats = pretrain_epoch(state, [batch], cfg.pretrain, torch.device("cpu"), seed=0)
    assert state.step == 1
    assert math.isfinite(stats["loss"])
    assert stats["loss"] > 0
    changed = [not torch.equal(b, p) for b, p in zip(before, encoder.parameters(), strict=True)]
    assert sum(changed) > len(changed) // 2  # the backbone itself was trained, not only the head
    assert len(state.criterion.index) == len(tags)  # the key encoder's keys were enqueued


def test_timm_weights_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    full = timm.create_model("test_resnet", pretrained=False, num_classes=7)  # with its classifier
    path = tmp_path / "w.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in full.state_dict().items()}}, path)
    loaded = build_encoder("timm:test_resnet", weights=path)
    expected = {k: v for k, v in full.state_dict().items() if not k.startswith("fc.")}
    assert loaded.state_dict().keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with pytest.raises(ValueError, match="does not exist"):
        build_encoder("timm:test_resnet", weights=tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="do not fit timm:test_efficientnet"):
        build_encoder("timm:test_efficientnet", weights=path)


def test_timm_weights_safetensors(tmp_path: Path) -> None:
    from safetensors.torch import save_file  # a dependency of timm

    full = timm.create_model("test_efficientnet", pretrained=False, num_classes=3)
    path = tmp_path / "w.safetensors"
    save_file(full.state_dict(), str(path))
    loaded = build_encoder("timm:test_efficientnet", weights=path)
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, full.state_dict()[key]), key


class _NotATensor:
    pass


def test_timm_weights_are_read_weights_only(tmp_path: Path) -> None:
    path = tmp_path / "pickled.pt"
    torch.save({"state_dict": {}, "extra": _NotATensor()}, path)
    with pytest.raises(ValueError, match="cannot read encoder weights"):
        build_encoder("timm:test_resnet", weights=path)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["model.arch=timm:resnet_nosuch"], r"model\.arch: expected 'timm:<name>' with a model name timm knows"),
        (["model.arch='timm:'"], r"model\.arch: expected 'timm:<name>'"),
        (["model.arch=vgg16"], r"model\.arch: expected one of .* or 'timm:<model name>'"),
        (["model.arch=timm:test_resnet", "model.width=0.5"], r"model\.width: expected 1\.0 with a timm backbone"),
    ],
    ids=["unknown-timm-model", "empty-timm-name", "unknown-arch", "width-with-timm"],
)
def test_timm_config_errors(overrides: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(ChestXrayConfig, TINY, overrides)


def test_build_encoder_refuses_width_with_timm() -> None:
    with pytest.raises(ValueError, match=r"`width` 1\.0 with a timm backbone"):
        build_encoder("timm:test_resnet", width=0.25)


@pytest.mark.parametrize(
    ("arch", "sizes", "match"),
    [
        # ConvNeXt's stride-32 stages leave nothing of a 24 px patch for the last downsampling conv
        (
            "timm:convnext_tiny",
            {"pretrain.patch_size": 24},
            r"model\.arch: .*takes pretrain\.patch_size 24 .*RuntimeError",
        ),
        # a ViT is built for one input size (224 px)
        (
            "timm:vit_tiny_patch16_224",
            {"data.image_size": 64},
            r"model\.arch: .*takes data\.image_size 64 .*AssertionError",
        ),
    ],
    ids=["convnext-small-patch", "vit-fixed-size"],
)
def test_encoder_that_cannot_take_the_input_size_is_a_config_error(
    arch: str, sizes: dict[str, int], match: str
) -> None:
    with pytest.raises(ConfigError, match=match) as err:
        build_encoder(arch, input_sizes=sizes)
    assert arch in str(err.value)
    assert "\n" not in str(err.value)


def test_input_size_probe_changes_nothing() -> None:
    """The probe leaves the random state, BatchNorm's running statistics and every module's mode as they were."""
    torch.manual_seed(0)
    plain = build_encoder("resnet18", 0.125)
    after_plain = torch.rand(4)
    torch.manual_seed(0)
    probed = build_encoder("resnet18", 0.125, input_sizes={"pretrain.patch_size": 24, "data.image_size": 64})
    assert torch.equal(torch.rand(4), after_plain)  # no random number drawn
    for name, value in plain.state_dict().items():  # weights and running statistics unchanged
        assert torch.equal(probed.state_dict()[name], value), name
    assert probed.training
    assert all(m.training for m in probed.modules())
    probed.layer1.eval()  # a submodule in eval mode stays so
    check_input_sizes(probed, "resnet18", {"data.image_size": 32})
    assert probed.training
    assert not probed.layer1.training
    assert not probed.layer1[0].bn1.training


@pytest.mark.parametrize(
    ("method", "arch", "key"),
    [
        ("comcl", "test_vit", r"pretrain\.patch_size 24"),  # 16 px ViT patches: 24 px inputs do not divide
        ("ce", "vit_tiny_patch16_224", r"data\.image_size 48"),  # 224 px only; ce never sees a patch
    ],
)
def test_pipeline_refuses_a_backbone_that_cannot_take_its_inputs(
    method: str, arch: str, key: str, tmp_path: Path, cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The pipeline probes its encoder with the patch and image sizes it will feed it: one-line error, exit 2,
    no folder left behind."""
    from examples.chestxray.train import main

    out = tmp_path / "run"
    args = ["--config", str(TINY), "--out", str(out), "--method", method, "--set", "run.tensorboard=false"]
    args += ["--set", f"data.synthetic.cache_dir={cache_dir}", "--set", "model.width=1.0"]
    assert main([*args, "--set", "pretrain.patch_size=24", "--set", f"model.arch=timm:{arch}"]) == 2
    err = capsys.readouterr().err
    assert "model.arch: expected a backbone that takes" in err
    assert re.search(key, err), err
    assert "Traceback" not in err
    assert not out.exists()
