"""The ablation runner: variants files, configuration checks, paired aggregation, one real tiny run."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path
from typing import Any

import pytest
from examples.common.ablation import (
    aggregate,
    config_differences,
    load_variants,
    main,
    render_section,
    run_variants,
)
from scipy import stats

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "examples" / "eyeq" / "configs" / "tiny.yaml"
CONFIG = {"pretrain": {"temperature": 0.2, "k": 32, "levels": {"lesion": 1.0}}, "run": {"torch_threads": 1}}


def _variants(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "variants.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def _run(seed: int, kappa: float, reject: float) -> dict[str, Any]:
    good = kappa + 0.05
    return {
        "seed": seed,
        "kappa": kappa,
        "accuracy": 0.5,
        "per_quality": {"good": {"kappa": good}, "usable": {"kappa": kappa}, "reject": {"kappa": reject}},
    }


def _comparison(folder: Path, runs: list[dict[str, Any]], config: dict[str, Any], losses: list[float]) -> None:
    folder.mkdir(parents=True)
    kappas = [r["kappa"] for r in runs]
    entry = {
        "kappa": sum(kappas) / len(kappas),
        "per_quality": {
            g: {"kappa": sum(r["per_quality"][g]["kappa"] for r in runs) / len(runs)}
            for g in ("good", "usable", "reject")
        },
        "seeds": [r["seed"] for r in runs],
        "runs": runs,
    }
    (folder / "compare.json").write_text(json.dumps({"comcl": entry}), encoding="utf-8")
    protocol = {"config": config, "machine": "test machine", "torch_threads": 1, "pretrained": str(folder / "pretrain")}
    (folder / "protocol.json").write_text(json.dumps(protocol), encoding="utf-8")
    for r in runs:
        pre = folder / "pretrain" / "comcl" / f"seed{r['seed']}"
        pre.mkdir(parents=True)
        rows = ["stage,epoch,step,name,value"] + [f"pretrain,{e + 1},{e},loss,{v}" for e, v in enumerate(losses)]
        (pre / "scalars.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
        (pre / "timing.json").write_text(json.dumps({"pretrain_s": 2.0}), encoding="utf-8")


# ---------------------------------------------------------------- variants files


def test_variants_file_puts_the_default_first_and_names_its_keys(tmp_path: Path) -> None:
    path = _variants(
        tmp_path,
        "tau0.1: {label: tau 0.1, set: [pretrain.temperature=0.1]}\n"
        "default: {label: CoMCL, set: []}\n"
        "spl: {label: threshold, set: [pretrain.self_paced.pace=linear, pretrain.self_paced.start=0.8]}\n",
    )
    variants = load_variants(path)
    assert list(variants) == ["default", "tau0.1", "spl"]
    assert variants["spl"].keys == ("pretrain.self_paced.pace", "pretrain.self_paced.start")
    assert variants["default"].overrides == ()


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("tau: {label: t, set: [pretrain.temperature=0.1]}\n", "'default' variant"),
        ("default: {label: d, set: [pretrain.k=8]}\n", "sets nothing"),
        ("default: {label: d}\nBad Name: {label: x, set: []}\n", "lower-case"),
        ("default: {label: d}\nk8: {label: x, set: pretrain.k=8}\n", "list of 'KEY=VALUE'"),
        ("default: {label: d}\nk8: {label: x, set: [pretrain.k]}\n", "list of 'KEY=VALUE'"),
        ("default: {label: d}\nk8: {set: [pretrain.k=8]}\n", "label: str"),
        (
            "default: {label: d}\na: {label: x, set: [pretrain.k=8]}\nb: {label: y, set: [pretrain.k=8]}\n",
            "same overrides",
        ),
        ("- default\n", "mapping"),
    ],
)
def test_bad_variants_files_are_refused(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load_variants(_variants(tmp_path, text))


def test_config_differences_leave_out_run_time_keys() -> None:
    other = {
        "pretrain": {"temperature": 0.1, "k": 32, "levels": {"lesion": 0.0}},
        "run": {"torch_threads": 2},
        "data": {"synthetic": {"cache_dir": "/elsewhere"}},
    }
    assert config_differences(CONFIG, other) == ["pretrain.levels.lesion", "pretrain.temperature"]


# ---------------------------------------------------------------- aggregation


def test_aggregate_pairs_by_seed_with_t_intervals(tmp_path: Path) -> None:
    ref_k, var_k = [0.80, 0.82, 0.78, 0.85], [0.83, 0.82, 0.81]  # the variant lacks seed 3
    ref_r, var_r = [0.50, 0.60, 0.55, 0.40], [0.58, 0.61, 0.50]
    _comparison(
        tmp_path / "bench",
        [_run(s, k, r) for s, (k, r) in enumerate(zip(ref_k, ref_r, strict=True))],
        CONFIG,
        [9.0, 7.0],
    )
    config = json.loads(json.dumps(CONFIG))
    config["pretrain"]["temperature"] = 0.1
    config["run"]["torch_threads"] = 2  # run-time: allowed
    _comparison(
        tmp_path / "abl" / "tau0.1",
        [_run(s, k, r) for s, (k, r) in enumerate(zip(var_k, var_r, strict=True))],
        config,
        [8.0, 6.0, 5.0],
    )
    variants = load_variants(
        _variants(tmp_path, "default: {label: CoMCL, set: []}\ntau0.1: {label: t, set: [pretrain.temperature=0.1]}\n")
    )
    result = aggregate(tmp_path / "abl", variants, reference=tmp_path / "bench")
    paired = result["variants"]["tau0.1"]["paired"]
    diffs = [v - r for v, r in zip(var_k, ref_k[:3], strict=True)]
    ci = stats.ttest_1samp(diffs, 0.0).confidence_interval(0.95)
    assert paired["seeds"] == [0, 1, 2]
    assert paired["overall"]["per_repeat"] == pytest.approx(diffs)
    assert (paired["overall"]["low"], paired["overall"]["high"]) == pytest.approx((ci.low, ci.high))
    drops = [(v + 0.05 - vr) - (r + 0.05 - rr) for v, vr, r, rr in zip(var_k, var_r, ref_k[:3], ref_r[:3], strict=True)]
    assert paired["drop"]["mean"] == pytest.approx(sum(drops) / 3)
    assert result["variants"]["tau0.1"]["pretrain_loss"] == [8.0, 6.0, 5.0]
    assert result["variants"]["default"]["pretrain_loss"] == [9.0, 7.0]
    assert result["variants"]["tau0.1"]["compute_s"] == pytest.approx(3 * 2.0)
    table = (tmp_path / "abl" / "ablation.md").read_text(encoding="utf-8")
    assert "| t − CoMCL | 3 |" in table
    assert (tmp_path / "abl" / "ablation_kappa.png").stat().st_size > 0
    section = render_section(tmp_path / "abl", "results/ablation")
    assert "seeds 0, 1, 2, 3" in section
    assert "![ablation_kappa.png](results/ablation/ablation_kappa.png)" in section


def test_a_method_variant_is_read_from_the_reference(tmp_path: Path) -> None:
    _comparison(tmp_path / "bench", [_run(0, 0.8, 0.5), _run(1, 0.7, 0.4)], CONFIG, [1.0])
    compare = json.loads((tmp_path / "bench" / "compare.json").read_text(encoding="utf-8"))
    compare["comcl_no_spl"] = json.loads(json.dumps(compare["comcl"]))
    for run, kappa in zip(compare["comcl_no_spl"]["runs"], (0.9, 0.6), strict=True):
        run["kappa"] = kappa
    (tmp_path / "bench" / "compare.json").write_text(json.dumps(compare), encoding="utf-8")
    text = "default: {label: CoMCL}\nspl_off: {label: w/o SPL, method: comcl_no_spl}\n"
    variants = load_variants(_variants(tmp_path, text))
    assert run_variants("eyeq", TINY, variants, 0, 2, tmp_path / "abl", skip_reference=True) == []  # nothing to run
    result = aggregate(tmp_path / "abl", variants, reference=tmp_path / "bench")
    assert result["variants"]["spl_off"]["paired"]["overall"]["per_repeat"] == pytest.approx([0.1, -0.1])
    assert "method `comcl_no_spl` of the reference" in (tmp_path / "abl" / "ablation.md").read_text(encoding="utf-8")
    with pytest.raises(ValueError, match="without `set`"):
        load_variants(
            _variants(tmp_path, "default: {label: d}\nx: {label: x, method: comcl_no_spl, set: [pretrain.k=8]}\n")
        )


def test_aggregate_refuses_a_variant_that_differs_in_a_key_it_does_not_set(tmp_path: Path) -> None:
    _comparison(tmp_path / "bench", [_run(0, 0.8, 0.5), _run(1, 0.7, 0.4)], CONFIG, [1.0])
    config = json.loads(json.dumps(CONFIG))
    config["pretrain"]["temperature"] = 0.1
    config["pretrain"]["k"] = 8  # not in the variant's overrides
    _comparison(tmp_path / "abl" / "tau0.1", [_run(0, 0.8, 0.5), _run(1, 0.7, 0.4)], config, [1.0])
    variants = load_variants(
        _variants(tmp_path, "default: {label: CoMCL}\ntau0.1: {label: t, set: [pretrain.temperature=0.1]}\n")
    )
    with pytest.raises(ValueError, match=r"keys it does not set: \['pretrain.k'\]"):
        aggregate(tmp_path / "abl", variants, reference=tmp_path / "bench")


def test_aggregate_names_a_variant_that_has_not_run(tmp_path: Path) -> None:
    _comparison(tmp_path / "bench", [_run(0, 0.8, 0.5), _run(1, 0.7, 0.4)], CONFIG, [1.0])
    variants = load_variants(_variants(tmp_path, "default: {label: CoMCL}\nk8: {label: k, set: [pretrain.k=8]}\n"))
    with pytest.raises(FileNotFoundError, match="has the variant run"):
        aggregate(tmp_path / "abl", variants, reference=tmp_path / "bench")


# ---------------------------------------------------------------- a real run


def test_run_on_the_tiny_configuration(tmp_path: Path, cache_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    variants = _variants(tmp_path, "default: {label: CoMCL, set: []}\nk2: {label: k 2, set: [pretrain.k=2]}\n")
    out = tmp_path / "abl"
    args = [
        "run",
        "--pipeline",
        "eyeq",
        "--config",
        str(TINY),
        "--variants",
        str(variants),
        "--seeds",
        "2",
        "--out",
        str(out),
    ]
    args += [
        "--set",
        "run.tensorboard=false",
        "--set",
        f"data.synthetic.cache_dir={cache_dir}",
        "--set",
        "run.torch_threads=1",
    ]
    assert main(args) == 0, capsys.readouterr().err
    result = json.loads((out / "ablation.json").read_text(encoding="utf-8"))
    assert result["variants"]["k2"]["set"] == ["pretrain.k=2"]
    assert result["variants"]["k2"]["paired"]["seeds"] == [0, 1]
    assert math.isfinite(result["variants"]["k2"]["paired"]["overall"]["mean"])
    assert len(result["variants"]["default"]["pretrain_loss"]) >= 1
    assert "[2/2] k2: done" in capsys.readouterr().out
    # resumable: a second run finds every repeat finished and gives the same numbers
    assert main(args) == 0
    assert json.loads((out / "ablation.json").read_text(encoding="utf-8"))["variants"] == result["variants"]
    assert (
        main(["run", "--pipeline", "nope", "--config", str(TINY), "--variants", str(variants), "--out", str(out)]) == 2
    )
    assert "`pipeline`" in capsys.readouterr().err


def test_unreadable_inputs_are_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="--variants: .* is not valid YAML"):
        load_variants(_variants(tmp_path, "default: [unclosed\n"))
    with pytest.raises(ValueError, match="--variants: .* is not valid YAML .key 'k8' appears twice"):
        load_variants(_variants(tmp_path, "default: {label: C}\nk8: {label: a, set: [pretrain.k=8]}\nk8: {label: b}\n"))
    with pytest.raises(FileNotFoundError, match="--variants: .* is not a file"):
        load_variants(tmp_path)
    variants = _variants(tmp_path, "default: {label: CoMCL}\nk8: {label: k, set: [pretrain.k = 8]}\n")
    twins = tmp_path / "twins.yaml"
    twins.write_text(
        "default: {label: d}\na: {label: x, set: [pretrain.k=8]}\nb: {label: y, set: ['pretrain.k = 8']}\n"
    )
    with pytest.raises(ValueError, match="same overrides"):  # spaces around '=' do not make another variant
        load_variants(twins)
    # a reference that is not a comparison is refused before anything runs
    out = tmp_path / "abl"
    args = ["run", "--pipeline", "eyeq", "--config", str(TINY), "--variants", str(variants), "--seeds", "2"]
    assert main([*args, "--out", str(out), "--reference", str(tmp_path / "empty")]) == 2
    assert "--reference: expected a finished comparison" in capsys.readouterr().err
    assert not out.exists()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "compare.json").write_text("{oops", encoding="utf-8")
    assert main([*args, "--out", str(out), "--reference", str(tmp_path / "bad")]) == 2
    assert "is not valid JSON" in capsys.readouterr().err
    assert main([*args[:4], str(tmp_path / "nope.yaml"), *args[5:], "--out", str(out)]) == 2
    assert "--config" in capsys.readouterr().err


def test_render_anywhere_and_say_when_a_section_is_new(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _comparison(tmp_path / "bench", [_run(0, 0.8, 0.5), _run(1, 0.7, 0.4)], CONFIG, [1.0])
    config = json.loads(json.dumps(CONFIG))
    config["pretrain"]["k"] = 8
    _comparison(tmp_path / "abl" / "k8", [_run(0, 0.81, 0.5), _run(1, 0.72, 0.4)], config, [1.0])
    variants = load_variants(_variants(tmp_path, "default: {label: CoMCL}\nk8: {label: k, set: [pretrain.k=8]}\n"))
    aggregate(tmp_path / "abl", variants, reference=tmp_path / "bench")
    md = tmp_path / "docs" / "RESULTS.md"  # not above the ablation's folder
    md.parent.mkdir()
    md.write_text("# Results\n", encoding="utf-8")
    assert main(["render", str(tmp_path / "abl"), str(md), "--name", "ablation"]) == 0
    assert "appended (no such section yet)" in capsys.readouterr().out
    assert "![ablation_kappa.png](../abl/ablation_kappa.png)" in md.read_text(encoding="utf-8")
    assert main(["render", str(tmp_path / "abl"), str(md), "--name", "ablation"]) == 0
    assert "rewrote section 'ablation'" in capsys.readouterr().out
    assert main(["render", str(tmp_path / "abl"), str(tmp_path), "--name", "ablation"]) == 2
    assert main(["render", str(tmp_path / "nothing"), str(md)]) == 2


# ---------------------------------------------------------------- checks before anything runs


@pytest.mark.parametrize(
    ("variants", "extra", "message"),
    [
        ("k: {label: k, set: [pretrain.kk=4]}\n", [], "variant 'k' (--set pretrain.kk=4): pretrain.kk: unknown key"),
        (
            "k: {label: k, set: [pretrain.k=0]}\n",
            [],
            "variant 'k' (--set pretrain.k=0): pretrain.k: expected an int >= 1",
        ),
        ("", ["--set", "foo"], "variant 'default' (--set foo): override 'foo': expected key=value"),
        ("", ["--seed", "-3"], "--seed: expected an int >= 0 (the first training seed), but got -3"),
        ("", ["--jobs", "0"], "--jobs: expected an int >= 1 (variants run at once), but got 0"),
        ("", ["--jobs", "-2"], "--jobs: expected an int >= 1 (variants run at once), but got -2"),
        ("spl_off: {label: w/o SPL, method: comcl_no_spl}\n", [], "variant 'spl_off' (method: comcl_no_spl) is read"),
        ("", ["--out", "/dev/null"], "--out: expected a directory, but /dev/null is not one"),
    ],
    ids=[
        "unknown-key",
        "bad-value",
        "set-without-value",
        "seed",
        "jobs-0",
        "jobs-negative",
        "method-needs-reference",
        "out-file",
    ],
)
def test_run_checks_every_variant_before_anything_runs(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    variants: str,
    extra: list[str],
    message: str,
) -> None:
    def no_run(*_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("a variant was started before the configuration was checked")

    monkeypatch.setattr("examples.common.ablation.subprocess.run", no_run)
    path = _variants(tmp_path, "default: {label: CoMCL, set: []}\n" + variants)
    out = tmp_path / "abl"
    args = ["run", "--pipeline", "eyeq", "--config", str(TINY), "--variants", str(path), "--seeds", "2"]
    assert main([*args, "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1  # one line
    assert not out.exists()  # nothing written


def test_a_method_variant_needs_its_method_in_the_reference(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _comparison(tmp_path / "bench", [_run(0, 0.8, 0.5), _run(1, 0.7, 0.4)], CONFIG, [1.0])
    path = _variants(tmp_path, "default: {label: CoMCL}\nspl_off: {label: w/o SPL, method: comcl_no_spl}\n")
    args = ["run", "--pipeline", "eyeq", "--config", str(TINY), "--variants", str(path), "--seeds", "2"]
    assert main([*args, "--out", str(tmp_path / "abl"), "--reference", str(tmp_path / "bench")]) == 2
    assert (
        "variant 'spl_off': expected the --reference comparison to have 'comcl_no_spl' runs, but it has ['comcl']"
        in (capsys.readouterr().err)
    )


@pytest.mark.parametrize(
    ("code", "state"),
    [
        (-2, "interrupted (exit -2)"),
        (130, "interrupted (exit 130)"),
        (-9, "killed by signal SIGKILL"),
        (1, "FAILED (exit 1"),
    ],
)
def test_a_stopped_variant_is_named_for_what_happened(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, code: int, state: str
) -> None:
    monkeypatch.setattr(
        "examples.common.ablation.subprocess.run", lambda cmd, **_: subprocess.CompletedProcess(cmd, code)
    )
    variants = load_variants(_variants(tmp_path, "default: {label: CoMCL}\nk8: {label: k, set: [pretrain.k=8]}\n"))
    assert run_variants("eyeq", TINY, variants, 0, 2, tmp_path / "abl") == ["default", "k8"]
    printed = capsys.readouterr().out
    assert f"default: {state}" in printed
    if code != 1:
        assert "FAILED" not in printed
    with pytest.raises(ValueError, match="`jobs`: expected an int >= 1, but got 0"):
        run_variants("eyeq", TINY, variants, 0, 2, tmp_path / "abl", jobs=0)
