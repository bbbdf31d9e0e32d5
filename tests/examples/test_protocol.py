"""The benchmark protocol: data draws without leaks, the labelled subset, encoder reuse, paired intervals."""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from examples.common.config import ConfigError, load_config
from examples.common.paired import comparison_pairs, paired_differences, paired_table
from examples.common.protocol import (
    OWN_LABEL_BASE,
    batch_own_labels,
    data_draw_seeds,
    label_groups,
    labelled_subset,
    pretrain_identity,
    unlabelled_label,
)
from examples.common.seeds import parse_seed_list
from examples.eyeq.data import NUM_GRADES, build_data
from examples.eyeq.train import EyeQConfig, main
from pipeline_helpers import assert_run_files_known, read_metrics, run_tiny
from scipy import stats

from mlcl_losses.tags import MAX_LABEL, ViewTags

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "examples" / "eyeq" / "configs" / "tiny.yaml"


def _run(out: Path, cache: Path, *extra: str) -> int:
    return run_tiny(main, TINY, out, cache, *extra)


def _tiny(cache: Path, *overrides: str) -> EyeQConfig:
    return load_config(EyeQConfig, TINY, [f"data.synthetic.cache_dir={cache}", *overrides])


def _digests(images: torch.Tensor) -> set[str]:
    return {hashlib.sha256(img.numpy().tobytes()).hexdigest() for img in images}


# ---------------------------------------------------------------- data draws


def test_draw_seeds_never_reuse_a_test_seed_for_training() -> None:
    train = {data_draw_seeds(1000, s)[0] for s in range(200)}
    test = {data_draw_seeds(1000, s)[1] for s in range(200)}
    assert len(train) == len(test) == 200  # a new draw per repeat
    assert not train & test
    assert data_draw_seeds(1000, 0) == (1000, 1001)  # repeat 0 is the single-draw layout
    assert data_draw_seeds(1000, 5, per_seed=False) == (1000, 1001)
    with pytest.raises(ValueError, match="`seed` >= 0"):
        data_draw_seeds(1000, -1)


def test_no_image_is_training_in_one_repeat_and_test_in_any(cache_dir: Path) -> None:
    cfg = _tiny(cache_dir)
    draws = [build_data(cfg, seed) for seed in range(3)]
    train = [_digests(d.views.records.data["image"]) for d in draws]
    test = [_digests(torch.stack([d.test[i][0] for i in range(len(d.test))]).mul(255).round().byte()) for d in draws]
    assert all(len(t) == cfg.data.synthetic.n_train for t in train)
    for i in range(3):
        for j in range(3):
            assert not train[i] & test[j], f"a training image of repeat {i} is a test image of repeat {j}"
    assert train[0] != train[1]
    assert test[0] != test[1]
    same = [build_data(_tiny(cache_dir, "data.synthetic.draw_per_seed=false"), s) for s in (0, 1)]
    assert torch.equal(same[0].views.records.data["image"], same[1].views.records.data["image"])


# ---------------------------------------------------------------- labelled subset


def test_labelled_subset_stratified_and_shared_by_methods() -> None:
    g = torch.Generator().manual_seed(0)
    strata = torch.randint(0, 5, (400,), generator=g).tolist()
    groups = torch.randint(0, 3, (400,), generator=g).tolist()
    pool = [i for i in range(400) if groups[i] == 0]
    chosen = labelled_subset(strata, groups, 0.25, [0], seed=3)
    assert chosen == labelled_subset(strata, groups, 0.25, [0], seed=3)  # the same for every method
    assert chosen != labelled_subset(strata, groups, 0.25, [0], seed=4)  # a new subset per repeat
    assert len(chosen) == round(0.25 * len(pool))
    assert all(groups[i] == 0 for i in chosen)
    want, got = Counter(strata[i] for i in pool), Counter(strata[i] for i in chosen)
    for k in want:
        assert abs(got[k] - 0.25 * want[k]) < 1, (k, got[k], want[k])
    assert labelled_subset(strata, groups, 1.0, [0], seed=0) == pool  # 1.0 with Good only: every Good image
    assert labelled_subset(strata, groups, 1.0, None, seed=0) == list(range(400))


def test_labelled_subset_one_per_stratum_and_errors() -> None:
    strata = [0] * 95 + [1] * 5
    chosen = labelled_subset(strata, [0] * 100, 0.05, None, seed=0)
    assert len(chosen) == 5
    assert any(strata[i] == 1 for i in chosen)
    with pytest.raises(ValueError, match="same length"):
        labelled_subset([0, 1], [0], 0.5, None, 0)
    with pytest.raises(ValueError, match=r"`fraction` in \(0, 1\]"):
        labelled_subset([0, 1], [0, 0], 0.0, None, 0)
    with pytest.raises(ValueError, match="no training image has a group"):
        labelled_subset([0, 1], [0, 0], 0.5, [2], 0)
    assert label_groups(["reject", "good"]) == [0, 2]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("finetune.label_fraction=0", "finetune.label_fraction: expected a fraction in (0, 1]"),
        ("finetune.label_fraction=1.5", "finetune.label_fraction: expected a fraction in (0, 1]"),
        ("finetune.label_qualities=[poor]", "finetune.label_qualities: expected null or a non-empty list"),
        ("finetune.label_qualities=[]", "finetune.label_qualities: expected null or a non-empty list"),
    ],
    ids=["zero", "above-one", "unknown-quality", "empty"],
)
def test_label_config_errors(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(EyeQConfig, TINY, [override])
    assert message in str(err.value)


def test_pipeline_labels_only_the_subset(cache_dir: Path) -> None:
    cfg = _tiny(
        cache_dir, "data.synthetic.n_train=24", "finetune.label_fraction=0.5", "finetune.label_qualities=[good]"
    )
    data = build_data(cfg, 0)
    quality = data.views.records.data["quality"].tolist()
    grades = data.views.records.data["grade"].tolist()
    good = [i for i, q in enumerate(quality) if q == 0]
    assert len(data.train) == round(0.5 * len(good))
    assert set(data.train.groups) == {0}
    assert len(data.views) == 24  # pre-training sees every training image
    labels = data.views.records.data["pretrain_label"].tolist()
    labelled = [i for i, lab in enumerate(labels) if lab < NUM_GRADES]
    assert len(labelled) == len(data.train)
    assert all(labels[i] == grades[i] for i in labelled)  # SupCon sees the grade inside the subset only
    others = [labels[i] for i in range(24) if i not in labelled]
    assert len(set(others)) == len(others)  # outside it, every image is a class of its own


def test_pretrain_identity_ignores_finetuning_except_supcon_labels() -> None:
    ident = {"model": {"width": 1}, "finetune": {"epochs": 3, "label_fraction": 0.1, "label_qualities": ["good"]}}
    assert pretrain_identity(ident, "comcl") == {"model": {"width": 1}}
    assert pretrain_identity(ident, "supcon")["labels"] == {"label_fraction": 0.1, "label_qualities": ["good"]}


# ---------------------------------------------------------------- encoder reuse, determinism


@pytest.mark.slow
def test_compare_pretrains_once_and_matches_single_runs(tmp_path: Path, cache_dir: Path) -> None:
    cell = ["--set", "finetune.label_fraction=0.5", "--set", "finetune.epochs=2"]
    assert _run(tmp_path / "single", cache_dir, *cell, "--method", "simclr", "--seed", "1") == 0
    cmp = tmp_path / "cmp"
    assert _run(cmp, cache_dir, *cell, "--compare", "--methods", "ce,simclr,supcon", "--seeds", "2") == 0
    assert (cmp / "paired_kappa.png").is_file()
    # fine-tuning the saved encoder gives what pre-training and fine-tuning in one run gives
    assert read_metrics(tmp_path / "single") == read_metrics(cmp / "simclr" / "seed1")
    encoder = cmp / "pretrain" / "simclr" / "seed0" / "encoder.pt"
    stamp = encoder.stat().st_mtime_ns
    # another cell reuses the encoders; SupCon, which saw the labels, pre-trains again
    other = tmp_path / "other"
    args = [
        "--set",
        "finetune.epochs=2",
        "--compare",
        "--methods",
        "simclr,supcon",
        "--pretrained",
        str(cmp / "pretrain"),
    ]
    assert _run(other, cache_dir, *args) == 0
    assert encoder.stat().st_mtime_ns == stamp
    assert not (other / "pretrain").exists()
    assert sorted(p.name for p in (cmp / "pretrain").iterdir()) == [
        "simclr",
        "supcon_labels0.5_all",
        "supcon_labels1_all",
    ]
    assert read_metrics(other / "simclr" / "seed0")["labelled_images"] == 16
    paired = json.loads((cmp / "paired.json").read_text())
    assert paired["simclr - ce"]["seeds"] == [0, 1]
    # an encoder of another pre-training configuration is refused, not silently reused
    changed = [*args, "--set", "pretrain.temperature=0.3"]
    assert _run(tmp_path / "third", cache_dir, *changed) == 2
    assert_run_files_known(cmp)  # --overwrite would leave no stale file (paired_kappa.png among them)


@pytest.mark.slow
def test_same_numbers_with_cold_and_warm_cache(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    args = ["--set", "data.synthetic.workers=1", "--set", "run.torch_threads=2", "--method", "simclr"]
    assert _run(tmp_path / "cold", cache, *args) == 0  # renders in this process
    assert _run(tmp_path / "warm", cache, *args) == 0  # reads the cache
    cold, warm = read_metrics(tmp_path / "cold"), read_metrics(tmp_path / "warm")
    assert cold["torch_threads"] == warm["torch_threads"] == 2
    assert cold == warm


# ---------------------------------------------------------------- paired differences


def _run_metrics(seed: int, kappa: float, good: float, reject: float) -> dict:
    groups = {"good": {"kappa": good}, "usable": {"kappa": kappa}, "reject": {"kappa": reject}}
    return {"seed": seed, "kappa": kappa, "per_quality": groups}


def test_paired_differences_t_interval() -> None:
    base = [_run_metrics(s, 0.5 + 0.1 * s, 0.6, 0.4) for s in range(4)]
    meth = [_run_metrics(s, 0.5 + 0.1 * s + d, 0.65, 0.5 + d) for s, d in enumerate([0.02, 0.05, 0.01, 0.08])]
    meth.append(_run_metrics(9, 0.9, 0.9, 0.9))  # no baseline for seed 9: not paired
    out = paired_differences({"ce": base, "comcl": meth}, ["good", "usable", "reject"], [("comcl", "ce")])
    entry = out["comcl - ce"]
    assert entry["seeds"] == [0, 1, 2, 3]
    d = [0.02, 0.05, 0.01, 0.08]
    mean, sd = sum(d) / 4, stats.tstd(d)
    half = stats.t.ppf(0.975, 3) * sd / math.sqrt(4)  # the textbook interval, from its formula
    torch.testing.assert_close(
        (entry["overall"]["mean"], entry["overall"]["low"], entry["overall"]["high"]),
        (mean, mean - half, mean + half),
    )
    # drop good -> reject: the method's drop is smaller, so the difference is negative
    drops = [(0.65 - (0.5 + x)) - (0.6 - 0.4) for x in d]
    torch.testing.assert_close(entry["drop"]["per_repeat"], drops)
    assert entry["drop"]["mean"] < 0
    single = paired_differences({"ce": base[:1], "comcl": meth[:1]}, ["good", "usable", "reject"], [("comcl", "ce")])
    assert math.isnan(single["comcl - ce"]["overall"]["low"])
    assert "+0.040 [" in paired_table(out, ["good", "usable", "reject"])


def test_comparison_pairs() -> None:
    methods = ["ce", "simclr", "supcon", "comcl_no_spl", "comcl_no_quality", "comcl"]
    pairs = comparison_pairs(methods)
    assert pairs[:5] == [(m, "ce") for m in methods[1:]]
    assert pairs[5:] == [("comcl", "simclr"), ("comcl", "supcon")]


# ---------------------------------------------------------------- RESULTS.md generation


def _fake_comparison(out: Path) -> None:
    from examples.common.compare import aggregate
    from examples.common.runlog import write_json

    groups = ["good", "usable", "reject"]
    runs = {
        "ce": [_run_metrics(s, 0.70 + 0.01 * s, 0.80, 0.50) for s in range(3)],
        "comcl": [_run_metrics(s, 0.78 + 0.01 * s, 0.82, 0.70 + 0.01 * s) for s in range(3)],
    }
    for m, rs in runs.items():
        for r in rs:
            r["labelled_images"] = 128
            for g in groups:
                r["per_quality"][g]["n"] = 10
            write_json(out / m / f"seed{r['seed']}" / "timing.json", {"finetune_s": 30.0, "evaluate_s": 1.0})
    write_json(out / "pretrain" / "comcl" / "seed0" / "timing.json", {"pretrain_s": 60.0})
    write_json(out / "compare.json", {m: aggregate(rs, groups) for m, rs in runs.items()})
    write_json(out / "paired.json", paired_differences(runs, groups, comparison_pairs(list(runs))))
    write_json(out / "protocol.json", {"command": "train.py --compare", "machine": "test machine", "torch_threads": 2})


def test_report_rewrites_only_its_section(tmp_path: Path) -> None:
    from examples.common.results_md import main as report

    _fake_comparison(tmp_path / "run")
    assert report(["collect", str(tmp_path / "run"), str(tmp_path / "repo" / "results" / "bench")]) == 0
    timing = json.loads((tmp_path / "repo" / "results" / "bench" / "timing.json").read_text())
    assert timing["total_s"] == 6 * 31.0 + 60.0
    md = tmp_path / "repo" / "RESULTS.md"
    md.write_text(
        "# Results\n\nhand-written text\n\n<!-- BEGIN generated:other -->\nkept\n<!-- END generated:other -->\n"
    )
    args = ["render", str(tmp_path / "repo" / "results" / "bench"), str(md), "--name", "bench"]
    assert report(args) == 0
    first = md.read_text()
    assert "hand-written text" in first
    assert "<!-- BEGIN generated:other -->\nkept\n" in first
    assert "| CoMCL (full) − cross-entropy only | 3 | +0.080 [+0.080, +0.080]" in first
    assert "goal ≥ +0.05 with the interval above 0: **met**" in first
    assert "ratio 0.367" in first  # mean drops 0.11 vs 0.30
    assert "Probes of the frozen" not in first  # a comparison without probes has no probe table
    assert report(args) == 0
    assert md.read_text() == first  # rewriting replaces the section, nothing is appended twice
    from examples.common.probe_report import probe_summary
    from examples.common.runlog import write_json

    probed = {
        m: [{"seed": s, "probes": {"linear_kappa": 0.5 + 0.1 * (m == "comcl") + 0.01 * s}} for s in range(3)]
        for m in ("ce", "comcl")
    }
    write_json(tmp_path / "repo" / "results" / "bench" / "probes.json", probe_summary(probed))
    assert report(args) == 0
    assert "| initial encoder (no pre-training) | 3 | 0.510 ± 0.010 |" in md.read_text()
    assert "| CoMCL (full) − initial encoder (no pre-training) | 3 | +0.100 [+0.100, +0.100] |" in md.read_text()
    assert report(["collect", str(tmp_path / "nothing"), str(tmp_path / "x")]) == 2


def test_subset_and_encoder_file_checks(tmp_path: Path) -> None:
    from examples.common.checkpoint import CheckpointError, save_checkpoint
    from examples.common.finetune import GradingDataset
    from examples.common.pipeline import encoder_fingerprint, load_encoder

    images = torch.arange(5.0).reshape(5, 1, 1, 1)
    full = GradingDataset(lambda i: images[i], [0, 1, 2, 3, 4], [0, 0, 1, 1, 2])
    sub = full.subset([4, 1])
    assert len(sub) == 2
    assert sub[0][1:] == (4, 2)
    assert float(sub[1][0]) == 1.0
    with pytest.raises(ValueError, match=r"`indices` in \[0, 5\)"):
        full.subset([5])
    path = tmp_path / "encoder.pt"
    assert encoder_fingerprint(path) is None
    save_checkpoint(path, {"kind": "encoder", "method": "simclr", "seed": 0, "fingerprint": "abc", "encoder": {}})
    assert encoder_fingerprint(path) == "abc"
    assert load_encoder(path, "simclr", 0)["fingerprint"] == "abc"
    with pytest.raises(CheckpointError, match="not the pre-trained encoder of method 'comcl', seed 0"):
        load_encoder(path, "comcl", 0)
    with pytest.raises(CheckpointError, match="seed 1"):
        load_encoder(path, "simclr", 1)
    (tmp_path / "bad.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="cannot read the pre-trained encoder"):
        load_encoder(tmp_path / "bad.pt", "simclr", 0)
    # an encoder written without a digest (a plain torch.save) is not used
    torch.save({"kind": "encoder", "method": "simclr", "seed": 0, "fingerprint": "abc", "encoder": {}}, path)
    with pytest.raises(CheckpointError, match="cannot read the pre-trained encoder"):
        load_encoder(path, "simclr", 0)


def test_corrupted_encoder_file_is_refused(tmp_path: Path) -> None:
    from examples.common.checkpoint import CheckpointError, save_checkpoint
    from examples.common.pipeline import load_encoder

    weight = torch.linspace(-1.0, 1.0, 64)
    path = tmp_path / "encoder.pt"
    save_checkpoint(
        path, {"kind": "encoder", "method": "comcl", "seed": 0, "fingerprint": "f", "encoder": {"w": weight}}
    )
    assert torch.equal(load_encoder(path, "comcl", 0)["encoder"]["w"], weight)
    data = bytearray(path.read_bytes())
    at = bytes(data).find(weight.numpy().tobytes()[:32])
    assert at >= 0
    data[at + 3] ^= 0x01  # one bit of one weight
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="encoder.pt"):
        load_encoder(path, "comcl", 0)


def test_chestxray_labels_only_the_subset(cache_dir: Path) -> None:
    from examples.chestxray.data import build_data as build_chest
    from examples.chestxray.train import ChestXrayConfig

    tiny = REPO / "examples" / "chestxray" / "configs" / "tiny.yaml"
    overrides = [f"data.synthetic.cache_dir={cache_dir}", "finetune.label_fraction=0.5"]
    cfg = load_config(ChestXrayConfig, tiny, overrides)
    data = build_chest(cfg, 0)
    n = cfg.data.synthetic.n_train
    assert len(data.views) == n
    assert len(data.train) == round(0.5 * n)
    labels = data.views.records.data["pretrain_label"].tolist()
    assert sum(lab < 2 for lab in labels) == len(data.train)  # "any finding" only inside the subset
    assert len({lab for lab in labels if lab >= 2}) == n - len(data.train)


def test_own_labels_unique_per_image_in_every_batch_however_large_the_set() -> None:
    """Beyond 8,175 images the data's own-class labels wrap; per batch, every image gets its own again."""
    period = MAX_LABEL + 1 - OWN_LABEL_BASE
    a, b = 3, 3 + period  # two unlabelled images whose data labels wrapped onto one value
    assert unlabelled_label(NUM_GRADES, a) == unlabelled_label(NUM_GRADES, b)
    image = torch.tensor([a, a, b, b, 7, 7, 9, 9])  # two views per image (SupCon's two-view batch)
    label = torch.tensor([unlabelled_label(5, a)] * 2 + [unlabelled_label(5, b)] * 2 + [2, 2, 2, 2])
    zeros = torch.zeros(8, dtype=torch.long)
    tags = ViewTags(zeros, zeros, torch.arange(8), label=label, image=image)
    out = batch_own_labels(tags)
    assert out.label is not None
    assert out.label[4:].tolist() == [2, 2, 2, 2]  # classes of the labelled subset kept
    assert out.label[0] == out.label[1] != out.label[2] == out.label[3]  # one label per image, no longer shared
    assert bool((out.label[:4] >= OWN_LABEL_BASE).all())
    assert tags.label is label  # the input is not changed
    assert label[0] == label[2]
    # under DDP every rank's own labels lie in a range of their own
    ranks = [batch_own_labels(tags, r, 4).label for r in range(4)]
    own = [set(r[:4].tolist()) for r in ranks if r is not None]
    assert all(own[i].isdisjoint(own[j]) for i in range(4) for j in range(i + 1, 4))
    assert max(max(o) for o in own) <= MAX_LABEL
    # a batch of labelled images only is returned as it is
    assert batch_own_labels(tags[4:]).equal(tags[4:])


def test_own_labels_errors() -> None:
    zeros = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="`label` and `image`"):
        batch_own_labels(ViewTags(zeros, zeros, zeros, label=zeros + OWN_LABEL_BASE))
    tags = ViewTags(zeros, zeros, zeros, label=zeros + OWN_LABEL_BASE, image=torch.arange(2))
    with pytest.raises(ValueError, match="rank 2 and world_size 2"):
        batch_own_labels(tags, 2, 2)
    many = torch.arange(3000)
    tags = ViewTags(many * 0, many * 0, many, label=many * 0 + OWN_LABEL_BASE, image=many)
    with pytest.raises(ValueError, match=r"at most 2043 images .*\(4 processes\), but got 3000"):
        batch_own_labels(tags, 0, 4)
    with pytest.raises(ValueError, match="`num_classes` in 1..16"):
        unlabelled_label(17, 0)


# ---------------------------------------------------------------- explicit seed lists


def test_parse_seed_list() -> None:
    assert parse_seed_list("0-2, 8,10-11") == [0, 1, 2, 8, 10, 11]
    for bad in ("", "a", "3-1", "-2", "1,1", "0-2,2", "1.5", "\u00b2", "\u0663"):
        with pytest.raises(ConfigError, match="--seed-list"):
            parse_seed_list(bad)


def test_seed_list_aggregates_comparisons_run_in_parallel(tmp_path: Path, cache_dir: Path) -> None:
    out = tmp_path / "cmp"
    cell = ["--set", "finetune.epochs=1", "--compare", "--methods", "ce,simclr", "--no-probes", "--resume"]
    for seed in ("0", "2"):  # two invocations into one folder, as two processes would
        assert _run(out, cache_dir, *cell, "--seed", seed) == 0
    finished = {p: p.stat().st_mtime_ns for p in out.glob("*/seed*/metrics.json")}
    assert len(finished) == 4
    assert _run(out, cache_dir, *cell, "--seed-list", "0,2") == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/seed*/metrics.json")} == finished  # nothing rerun
    compare = json.loads((out / "compare.json").read_text())
    assert compare["simclr"]["seeds"] == [0, 2]
    assert json.loads((out / "paired.json").read_text())["simclr - ce"]["seeds"] == [0, 2]
    assert json.loads((out / "protocol.json").read_text())["seeds_done"] == [0, 2]
    for other in (("--seeds", "3"), ("--seeds", "1"), ("--seed", "0")):  # one or the other, even --seeds 1
        assert _run(out, cache_dir, *cell, "--seed-list", "0,2", *other) == 2
