"""Probes of the frozen encoder: known answers on constructed features, then the tiny pipeline."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from examples.common.config import load_config
from examples.common.models import build_encoder
from examples.common.probe_report import probe_summary, probe_table, run_probes
from examples.common.probes import PROBE_KEYS, artefact_retrieval, linear_probe, quality_invariance

from mlcl_losses.tags import ViewTags

TINY = Path(__file__).resolve().parents[2] / "examples" / "eyeq" / "configs" / "tiny.yaml"


def _views(n_images: int) -> tuple[ViewTags, list[int], list[int], list[int], list[int]]:
    """Tags of ``n_images`` images, one lesion (V1a, V1b, V2) and one healthy patch (V3, V4) each.

    Returns the tags and the row numbers of V1a, V2, V3 and V4 per image.
    """
    kind, quality, source, image = [], [], [], []
    rows: dict[str, list[int]] = {"v1": [], "v2": [], "v3": [], "v4": []}
    for i in range(n_images):
        for view, k, q, s in (("v1", 1, 0, 2 * i), ("v1b", 1, 0, 2 * i), ("v2", 1, 1, 2 * i), ("v3", 0, 0, 2 * i + 1),
                              ("v4", 0, 1, 2 * i + 1)):  # fmt: skip
            if view in rows:
                rows[view].append(len(kind))
            kind.append(k)
            quality.append(q)
            source.append(s)
            image.append(i)
    return ViewTags(kind, quality, source, image=image), rows["v1"], rows["v2"], rows["v3"], rows["v4"]


def _fill(n_rows: int, dim: int, assign: dict[int, torch.Tensor]) -> torch.Tensor:
    x = torch.zeros(n_rows, dim)
    for row, value in assign.items():
        x[row] = value
    return x


def test_artefact_retrieval_is_one_when_degraded_healthy_patches_stay_healthy() -> None:
    tags, v1, v2, v3, v4 = _views(6)
    g = torch.Generator().manual_seed(0)
    healthy, lesion = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    x = torch.zeros(len(tags), 3)
    for rows, direction in ((v1, lesion), (v2, lesion), (v3, healthy), (v4, healthy)):
        for r in rows:
            x[r] = direction + 0.1 * torch.rand(3, generator=g)
    x[[r + 1 for r in v1]] = x[v1]  # V1b == V1a
    out = artefact_retrieval(x, tags, k=3)
    assert out["auroc"] == pytest.approx(1.0)
    assert out["precision_at_k"] == pytest.approx(1.0)
    assert out["n_queries"] == 6
    assert out["n_bank"] == 12  # one V1 and one V3 per image (the query's own image is left out per query)
    assert out["healthy_share"] == pytest.approx(0.5)


def test_artefact_retrieval_zero_when_artefacts_read_as_lesions_and_half_when_blind() -> None:
    tags, v1, v2, v3, v4 = _views(5)
    healthy, lesion = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    x = _fill(len(tags), 2, {r: lesion for r in v1 + v2 + v4} | {r: healthy for r in v3})
    x[[r + 1 for r in v1]] = lesion
    assert artefact_retrieval(x, tags)["auroc"] == pytest.approx(0.0)
    blind = artefact_retrieval(torch.ones(len(tags), 2), tags, k=4)  # every similarity ties
    assert blind["auroc"] == pytest.approx(0.5)


def test_artefact_retrieval_leaves_the_query_image_out() -> None:
    # V4 of each image equals its own image's V1 lesion, but is healthy-like against every other image
    tags, v1, v2, v3, v4 = _views(4)
    x = torch.zeros(len(tags), 8)
    for i in range(4):
        x[v1[i]] = x[v1[i] + 1] = x[v2[i]] = torch.eye(8)[i]
        x[v3[i]] = torch.eye(8)[4 + i] + 0.5 * torch.eye(8)[i]
        x[v4[i]] = torch.eye(8)[i] + sum(torch.eye(8)[4 + j] for j in range(4) if j != i)
    assert artefact_retrieval(x, tags, k=3)["auroc"] == pytest.approx(1.0)


def test_quality_invariance_known_answers() -> None:
    tags, v1, v2, v3, v4 = _views(5)
    eye = torch.eye(5)
    same = _fill(len(tags), 5, {v1[i]: eye[i] for i in range(5)} | {v2[i]: eye[i] for i in range(5)})
    same[[r + 1 for r in v1]] = same[v1]
    out = quality_invariance(same, tags)
    assert out["auroc"] == pytest.approx(1.0)
    assert out["recall_at_1"] == pytest.approx(1.0)
    assert out["margin"] == pytest.approx(1.0)  # cos 1 with its own, 0 with every other
    assert out["n_queries"] == out["n_bank"] == 5
    shifted = same.clone()  # V2 of lesion i looks like V1 of lesion i + 1: never its own
    shifted[v2] = eye[[(i + 1) % 5 for i in range(5)]]
    out = quality_invariance(shifted, tags)
    assert out["recall_at_1"] == 0.0
    assert out["auroc"] == pytest.approx(0.5 * 3 / 4)  # own tied with 3 of 4 others, below the 4th
    assert out["margin"] == pytest.approx(-0.25)
    assert quality_invariance(torch.ones(len(tags), 5), tags)["auroc"] == pytest.approx(0.5)


def test_probes_refuse_bad_input() -> None:
    tags, *_ = _views(3)
    with pytest.raises(ValueError, match="one row per tag"):
        artefact_retrieval(torch.zeros(len(tags) - 1, 4), tags)
    with pytest.raises(ValueError, match="`k`"):
        artefact_retrieval(torch.zeros(len(tags), 4), tags, k=0)
    no_image = ViewTags(tags.kind, tags.quality, tags.source)
    with pytest.raises(ValueError, match="image"):
        artefact_retrieval(torch.zeros(len(tags), 4), no_image)
    with pytest.raises(ValueError, match="train_targets"):
        linear_probe(torch.zeros(4, 2), torch.tensor([0, 1, 5, 0]), torch.zeros(2, 2), torch.tensor([0, 1]),
                     torch.tensor([0, 0]), ["good"], 2)  # fmt: skip
    with pytest.raises(ValueError, match="same width"):
        linear_probe(torch.zeros(4, 2), torch.tensor([0, 1, 1, 0]), torch.zeros(2, 3), torch.tensor([0, 1]),
                     torch.tensor([0, 0]), ["good"], 2)  # fmt: skip


def test_linear_probe_separable_features_and_per_group() -> None:
    g = torch.Generator().manual_seed(1)
    centres = 4.0 * torch.eye(3, 6)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % 3
        return centres[y] + 0.2 * torch.randn(n, 6, generator=g), y

    x_train, y_train = draw(60)
    x_test, y_test = draw(30)
    groups = torch.arange(30) % 2
    out = linear_probe(x_train, y_train, x_test, y_test, groups, ["Good", "Reject"], num_classes=3)
    assert out["accuracy"] == pytest.approx(1.0)
    assert out["kappa"] == pytest.approx(1.0)
    assert set(out["per_quality"]) == {"good", "reject"}
    assert out["per_quality"]["good"]["n"] == 15
    assert out["per_quality"]["reject"]["kappa"] == pytest.approx(1.0)
    noise = linear_probe(torch.randn(60, 6, generator=g), y_train, x_test, y_test, groups, ["Good", "Reject"], 3)
    assert noise["accuracy"] < 0.7  # the same test set, features that carry no class
    one = linear_probe(x_train, torch.zeros(60, dtype=torch.long), x_test, y_test, groups, ["Good", "Reject"], 3)
    assert one["accuracy"] == pytest.approx(1 / 3)  # a single training class is predicted everywhere


@pytest.fixture(scope="module")
def tiny_data(cache_dir: Path) -> object:
    from examples.eyeq.data import build_data
    from examples.eyeq.train import EyeQConfig

    cfg = load_config(EyeQConfig, TINY, [f"data.synthetic.cache_dir={cache_dir}"])
    return cfg, build_data(cfg, 0)


def test_probes_on_the_tiny_pipeline_shapes_ranges_determinism(tiny_data: tuple) -> None:
    cfg, data = tiny_data
    torch.manual_seed(0)
    encoder = build_encoder(cfg.model.arch, cfg.model.width)
    first = run_probes(encoder, data)
    again = run_probes(encoder, data)
    assert {k: first[k] for k in PROBE_KEYS} == {k: again[k] for k in PROBE_KEYS}
    for key in ("artefact_auroc", "artefact_precision_at_k", "invariance_auroc"):
        assert 0.0 <= first[key] <= 1.0, key
    assert -2.0 <= first["invariance_margin"] <= 2.0
    assert -1.0 <= first["linear_kappa"] <= 1.0
    assert first["artefact"]["n_queries"] > 0
    assert first["invariance"]["n_queries"] > 0
    assert set(first["linear"]["per_quality"]) == {"good", "usable", "reject"}
    assert first["linear"]["n"] == len(data.test)
    # the probe patches are the held-out test images' (16 images, one healthy patch each)
    assert first["artefact"]["n_queries"] == cfg.data.synthetic.n_test * cfg.pretrain.n_healthy


def _run(seed: int, values: dict[str, float]) -> dict:
    return {"seed": seed, "probes": dict.fromkeys(PROBE_KEYS, math.nan) | values}


def test_probe_summary_pairs_by_seed_with_t_interval() -> None:
    from scipy import stats

    comcl = [_run(s, {"artefact_auroc": a}) for s, a in ((0, 0.9), (1, 0.8), (2, 0.85))]
    simclr = [_run(s, {"artefact_auroc": a}) for s, a in ((2, 0.7), (0, 0.6), (1, 0.75))]
    summary = probe_summary({"ce": [{"seed": 0}], "simclr": simclr, "comcl": comcl})
    assert set(summary["methods"]) == {"simclr", "comcl"}  # ce has no encoder and no probe
    d = summary["paired"]["comcl - simclr"]["artefact_auroc"]
    diffs = [0.9 - 0.6, 0.8 - 0.75, 0.85 - 0.7]
    assert d["per_repeat"] == pytest.approx(diffs)
    ci = stats.ttest_1samp(diffs, 0.0).confidence_interval(0.95)
    assert (d["low"], d["high"]) == pytest.approx((ci.low, ci.high))
    assert d["mean"] == pytest.approx(sum(diffs) / 3)
    assert math.isnan(summary["paired"]["comcl - simclr"]["linear_kappa"]["mean"])  # never measured
    assert summary["linear_per_quality"] == {}  # no linear probe in these runs
    table = probe_table(summary, {"comcl": "CoMCL", "simclr": "SimCLR"})
    assert "CoMCL − SimCLR" in table
    assert f"{d['mean']:+.3f} [{ci.low:+.3f}, {ci.high:+.3f}]" in table


def test_compare_writes_probes_with_paired_intervals(tmp_path: Path, cache_dir: Path) -> None:
    from examples.eyeq.train import main
    from tests.examples.pipeline_helpers import run_tiny

    out = tmp_path / "cmp"
    args = ("--compare", "--methods", "ce,simclr,comcl", "--seeds", "2", "--set", "finetune.epochs=1")
    assert run_tiny(main, TINY, out, cache_dir, *args) == 0
    summary = json.loads((out / "probes.json").read_text())
    assert set(summary["methods"]) == {"ce", "simclr", "comcl"}  # ce: the initial encoder
    assert set(summary["paired"]) == {"comcl - ce", "comcl - simclr", "simclr - ce"}
    pair = summary["paired"]["comcl - simclr"]
    assert pair["seeds"] == [0, 1]
    for key in PROBE_KEYS:
        assert pair[key]["n"] == 2, key
        assert pair[key]["low"] <= pair[key]["mean"] <= pair[key]["high"], key
    runs = json.loads((out / "compare.json").read_text())
    initial = runs["ce"]["runs"][0]["probes"]
    assert json.loads((out / "ce" / "seed0" / "probes.json").read_text())["probes"] == initial
    assert initial != runs["comcl"]["runs"][0]["probes"]  # pre-training moved the encoder
    probed = runs["comcl"]["runs"][1]["probes"]
    assert probed["artefact_auroc"] == summary["methods"]["comcl"]["artefact_auroc"]["per_repeat"][1]
    cached = json.loads(next((out / "pretrain").glob("comcl*/seed1/probes.json")).read_text())
    assert cached["probes"] == probed
    kappas = [r["probes"]["linear"]["per_quality"]["reject"]["kappa"] for r in runs["comcl"]["runs"]]
    reject = summary["linear_per_quality"]["comcl"]["reject"]
    assert reject["n"] == sum(k is not None for k in kappas)
    if reject["n"]:
        assert reject["mean"] == pytest.approx(sum(k for k in kappas if k is not None) / reject["n"])
    assert "Probes of the frozen pre-trained encoders" in (out / "compare.md").read_text()
    assert "linear probe κ reject" in (out / "compare.md").read_text()
    assert (out / "paired_probes.png").stat().st_size > 0
    # the stand-alone command probes the same encoders to the same numbers, and fills a results section
    from examples.eyeq.probe import main as probe_main

    md = tmp_path / "RESULTS.md"
    md.write_text(
        "# results\n\nkept\n\n<!-- BEGIN generated:probes -->\nold\n<!-- END generated:probes -->\n\nkept too\n"
    )
    argv = ["--config", str(out / "config.yaml"), "--pretrained", str(out / "pretrain"), "--out", str(tmp_path / "p")]
    assert probe_main([*argv, "--results-md", str(md)]) == 0
    again = json.loads((tmp_path / "p" / "probes.json").read_text())
    assert again["methods"] == summary["methods"]
    assert again["paired"] == summary["paired"]
    text = md.read_text()
    assert "old" not in text
    assert text.startswith("# results\n\nkept\n")
    assert text.endswith("kept too\n")
    assert "CoMCL (full) − SimCLR pre-training" in text
    assert "](p/paired_probes.png)" in text
    assert probe_main([*argv, "--results-md", str(tmp_path / "missing.md")]) == 2


def test_initial_encoder_is_where_every_run_of_the_repeat_starts() -> None:
    from examples.common.checkpoint import seed_everything
    from examples.common.config import ModelConfig
    from examples.common.probe_report import initial_encoder

    cfg = ModelConfig(arch="resnet18", width=0.125)
    seed_everything(3)  # as run_pipeline does before building its encoder
    expected = build_encoder(cfg.arch, cfg.width, cfg.weights).state_dict()
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    got = initial_encoder(cfg, 3).state_dict()
    assert torch.equal(torch.random.get_rng_state(), before)  # the global RNG is untouched
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    other = initial_encoder(cfg, 4).state_dict()
    assert not torch.equal(other["conv1.weight"], expected["conv1.weight"])
