"""The search-efficiency benchmark (scripts/bench/search_efficiency.py) and the search defaults
it set: the smoke run end to end (every method runs, the JSON has the keys the README quotes),
plus in-process checks of its pure parts, of ``pick_best``'s rules and of how a stopped trial
is told to Optuna. The goals are measured by the script, never asserted here (smoke numbers
mean nothing).

    python -m pytest tests/test_search_efficiency.py -q       # about 2 min on 2 busy cores
    python -m pytest tests/test_search_efficiency.py -m "not slow"   # seconds
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from helpers import run_script

from tune_pets.search import build_parser
from tune_pets.search_plan import make_sampler, spec_from_args, startup_trials
from tune_pets.search_ray import make_tuner
from tune_pets.search_results import PICK_RULES, final_mean, make_record, pick_best
from tune_pets.spaces import SearchSpec, default_space, load_search_spec
from tune_pets.utils import UserError

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts/bench/search_efficiency.py"
sys.path.insert(0, str(REPO / "scripts"))
from bench import search_efficiency as se  # noqa: E402

TOP_KEYS = set(
    "benchmark created argv mode settings machine versions data budget methods search "
    "ray_startup_s_not_charged workload_check target search_time_to_target_ratio "
    "search_vs_optuna_ratio search_final_best search_time_to_target_s search_pick_test_acc "
    "goals ratio_notes diagnostics test_scoring loadavg_summary loadavg_at_end total_wall_s "
    "note".split()
)
METHOD_KEYS = set(
    "name runs final_best time_to_target_s time_to_target_after_first_report_s first_report_s "
    "trial_epochs trials pick_test_acc".split()
)
RUN_KEYS = set(
    "seed curve final_best first_report_s trials trials_reporting_in_budget trial_epochs "
    "completed stopped_early failed wall_s errors picks events loadavg_start loadavg_end "
    "time_to_target_s".split()
)


def _spec(**kw) -> SearchSpec:
    base = {"model": "cnn", "max_epochs": 4, "space": {"lr": ("loguniform", [1e-4, 1e-2])}}
    return SearchSpec(**{**base, **kw})


# ---------------------------------------------------------------- the smoke run
@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> tuple[dict, Path, str]:
    """One ``--smoke`` run (real photos from ../shared when present, else the shipped sample):
    (JSON, PNG path, stdout)."""
    tmp = tmp_path_factory.mktemp("search_eff")
    out = tmp / "bench" / "se.json"
    proc = run_script(SCRIPT, ["--smoke", "--out", out], tmp, timeout=420,
                      TUNE_PETS_CACHE=str(tmp / "cache"))  # fmt: skip
    stdout = proc.stdout
    return json.loads(out.read_text()), out.with_suffix(".png"), stdout


@pytest.mark.slow
def test_smoke_run_every_method_ran_and_the_json_has_its_keys(smoke_run):
    result, png, stdout = smoke_run
    assert set(result) == TOP_KEYS, set(result) ^ TOP_KEYS
    assert result["mode"] == "smoke" and result["budget"]["kind"] == "equal wall-clock"
    assert result["data"]["source"] in ("real", "sample")
    assert set(result["methods"]) == set("abcdef")
    seeds = result["settings"]["seeds"]
    for key, m in result["methods"].items():
        assert set(m) == METHOD_KEYS, (key, set(m) ^ METHOD_KEYS)
        assert len(m["runs"]) == seeds, key
        for run in m["runs"]:
            assert set(run) == RUN_KEYS, (key, set(run) ^ RUN_KEYS)
            assert run["trials"] >= 1 and run["events"], f"method {key} reported nothing"
            assert run["errors"] == 0 and run["failed"] == 0, key
            for rule in PICK_RULES:
                pick = run["picks"][rule]
                assert pick is not None and 0.0 <= pick["test_acc"] <= 1.0, (key, rule)
    for key in ("search_final_best", "search_time_to_target_s", "search_pick_test_acc"):
        assert set(result[key]) == set("abcdef"), key
    assert set(result["goals"]) == {"search_time_to_target_ratio", "search_vs_optuna_ratio"}
    check = result["workload_check"]
    assert {"runs", "separates", "verdict", "val_sampling_sd", "best_val_acc"} <= set(check)
    assert len(check["runs"]) == sum(result["settings"][k] for k in ("check_random", "check_seeds"))
    assert png.is_file() and png.stat().st_size > 10_000
    assert "search_time_to_target_ratio" in stdout


# ---------------------------------------------------------------- the script's parts
def test_best_so_far_and_time_to_target():
    events = [[5.0, 0.4, "t1", 1], [2.0, 0.3, "t2", 1], [9.0, 0.6, "t1", 2], [12.0, 0.9, "t2", 2]]
    curve = se.best_so_far(events, budget_s=10.0)
    assert curve == [[2.0, 0.3], [5.0, 0.4], [9.0, 0.6]]  # the report after the budget is out
    assert se.time_to(curve, 0.4) == 5.0 and se.time_to(curve, 0.61) is None
    assert se.best_so_far(events, 10.0, mode="min") == [[2.0, 0.3]]


def test_medians_count_a_run_that_never_got_there_as_infinitely_slow():
    assert se.stats([3.0, None, 1.0]) == {"median": 3.0, "min": 1.0, "max": None}
    assert se.stats([None, None, 1.0])["median"] is None
    assert se._ratio(30.0, 10.0) == 3.0
    assert se._ratio(30.0, None) == 0.0  # a never got there
    assert se._ratio(None, 10.0) is None  # c never did: infinite, said in ratio_notes


def test_finalize_computes_target_and_ratios_from_the_runs():
    def run(seed, curve, picks=None):
        return {"seed": seed, "curve": curve, "final_best": curve[-1][1] if curve else None,
                "first_report_s": curve[0][0], "trial_epochs": 3,
                "trials_reporting_in_budget": 2, "picks": picks or {}}  # fmt: skip

    result = {
        "methods": {
            "a": {"runs": [run(0, [[1.0, 0.5], [2.0, 0.7]]), run(1, [[3.0, 0.66]]),
                           run(2, [[4.0, 0.5]])]},
            "c": {"runs": [run(0, [[6.0, 0.6]]), run(1, [[8.0, 0.6], [20.0, 0.65]]),
                           run(2, [[30.0, 0.63]])]},
            "e": {"runs": [run(0, [[4.0, 0.5]]), run(1, [[4.0, 0.7]]), run(2, [[5.0, 0.7]])]},
        }
    }  # fmt: skip
    se.finalize(result, _spec())
    assert result["target"]["value"] == pytest.approx(0.63)  # c's median final best
    assert result["methods"]["c"]["time_to_target_s"]["per_seed"] == [None, 20.0, 30.0]
    assert result["methods"]["a"]["time_to_target_s"]["per_seed"] == [2.0, 3.0, None]
    assert result["search_time_to_target_ratio"] == pytest.approx(30.0 / 3.0)
    assert result["search_vs_optuna_ratio"] == pytest.approx(5.0 / 3.0)
    assert all(g["met"] for g in result["goals"].values())
    assert result["search_final_best"] == {"a": 0.66, "c": 0.63, "e": 0.7}
    # From each run's first report: a 1.0 / 0.0 / never, c never / 12 / 0, e never / 0 / 0.
    diag = result["diagnostics"]
    assert diag["time_to_target_after_first_report_s"] == {"a": 1.0, "c": 12.0, "e": 0.0}
    assert diag["search_time_to_target_ratio_after_first_report"] == pytest.approx(12.0)


def test_bench_spec_is_the_shipped_space_at_one_image_size():
    spec = se.bench_spec(se.SETTINGS["full"])
    assert "img_size" not in spec.space and spec.fixed["img_size"] == 48
    assert {"lr", "batch_size", "weight_decay"} <= set(spec.space)
    assert spec.time_budget_s == se.SETTINGS["full"]["budget_s"] and spec.split_seed == 0


# ---------------------------------------------------------------- defaults it set
def test_tpe_sampler_defaults_fit_the_search():
    assert [startup_trials(n) for n in (1, 4, 24, 40, 500)] == [4, 4, 5, 8, 10]
    tpe = make_sampler(_spec(num_samples=24, seed=3))
    assert type(tpe).__name__ == "TPESampler"
    assert (tpe._multivariate, tpe._constant_liar, tpe._n_startup_trials) == (True, True, 5)
    assert type(make_sampler(_spec(), "random")).__name__ == "RandomSampler"
    with pytest.raises(ValueError, match="searcher"):
        make_sampler(_spec(), "grid")
    with pytest.raises(ValueError, match="scheduler"):
        make_tuner(None, _spec(), Path("/tmp"), "x", scheduler="hyperband")


def test_a_stopped_trial_is_told_to_optuna_as_pruned_at_its_last_epoch():
    """The searcher make_tuner uses, driven in-process as Tune drives it (the result that ends a
    trial goes to on_trial_complete only): a trial ASHA stopped at epoch 2 of 4 is PRUNED with
    its epoch-2 value (it was told its epoch-1 value: the stopping epoch was lost), one that ran
    to max_epochs COMPLETE, one that raised FAIL."""
    import optuna
    from optuna.trial import TrialState

    from tune_pets.search_ray import _ray_classes
    from tune_pets.search_results import optuna_distributions

    spec = _spec(max_epochs=4)
    searcher = _ray_classes().StoppedAsPruned(
        space=optuna_distributions(spec), metric="val_acc", mode="max",
        sampler=optuna.samplers.RandomSampler(seed=0), max_epochs=4)  # fmt: skip
    for tid, epochs in (("stopped", 2), ("done", 4)):
        assert searcher.suggest(tid) is not None
        for e in range(1, epochs + 1):
            result = {"val_acc": 0.1 * e, "epoch": e, "training_iteration": e}
            if e < epochs:
                searcher.on_trial_result(tid, result)
        searcher.on_trial_complete(tid, result)
    searcher.suggest("broken")
    searcher.on_trial_complete("broken", None, error=True)
    # OptunaSearch keeps its study private; reading it is the only way to see what it was told.
    trials = searcher._ot_study.get_trials(deepcopy=False)
    assert [(t.state, t.value) for t in trials] == [
        (TrialState.PRUNED, pytest.approx(0.2)),
        (TrialState.COMPLETE, pytest.approx(0.4)),
        (TrialState.FAIL, None),
    ]
    assert trials[0].intermediate_values == pytest.approx({1: 0.1, 2: 0.2})


def test_pick_rules_best_epoch_and_final_mean():
    spec = _spec(max_epochs=4)

    def rec(tid, values, **kw):
        reports = [{"epoch": e, "val_acc": v} for e, v in enumerate(values, 1)]
        return make_record(tid, {"lr": 1e-3}, reports, spec, **kw)

    lucky = rec("lucky", [0.3, 0.9])  # stopped early on one lucky epoch
    steady = rec("steady", [0.5, 0.7, 0.72, 0.71])
    spiky = rec("spiky", [0.4, 0.8, 0.5, 0.55])
    broke = rec("broke", [0.95, 0.99, 0.99, 0.99], error="E: boom")
    records = [lucky, steady, spiky, broke]
    assert pick_best(records, spec) is lucky
    assert pick_best(records, spec, rule="final_mean") is steady
    assert final_mean(spiky, "val_acc") == pytest.approx((0.8 + 0.5 + 0.55) / 3)
    assert final_mean(lucky, "val_acc", k=5) == pytest.approx(0.6)
    # Nothing ran to max_epochs: the trials that ran the longest compete.
    assert pick_best([lucky, rec("short", [0.99])], spec, rule="final_mean") is lucky
    assert pick_best([broke], spec, rule="final_mean") is None
    assert math.isclose(pick_best([steady], _spec(mode="min"), "final_mean").best_value, 0.72)
    # A trial whose last epochs diverged (NaN) is not scored on the epochs before: it drops
    # out, and the longest of the rest compete (it ran the most epochs).
    diverged = rec("diverged", [0.6, 0.9, math.nan, math.nan])
    assert final_mean(diverged, "val_acc") is None
    assert pick_best([diverged, steady], spec, rule="final_mean") is steady
    assert pick_best([diverged, lucky], spec, rule="final_mean") is lucky
    with pytest.raises(ValueError, match="pick rule"):
        pick_best(records, spec, rule="median")
    # The spec's pick (the YAML's pick:, or --pick) is the default rule.
    assert pick_best(records, _spec(max_epochs=4, pick="final_mean")) is steady


def test_ties_go_to_the_earlier_epoch_and_the_earlier_trial():
    """A trial's best epoch is the first with its best score, and its val_macro_f1 is that
    epoch's; of two trials with the same scores the one started first is picked, by either
    rule (its checkpoint is the one kept)."""
    spec = _spec(max_epochs=3)

    def rec(tid, f1s):
        scores = zip((1, 2, 3), (0.5, 0.8, 0.8), f1s, strict=True)
        reports = [{"epoch": e, "val_acc": a, "val_macro_f1": f} for e, a, f in scores]
        return make_record(tid, {"lr": 1e-3}, reports, spec)

    a, b = rec("a", (0.1, 0.7, 0.3)), rec("b", (0.2, 0.6, 0.6))
    assert (a.best_epoch, a.best_value, a.val_macro_f1) == (2, 0.8, 0.7)
    for rule in PICK_RULES:
        assert pick_best([a, b], spec, rule) is a and pick_best([b, a], spec, rule) is b


def test_pick_comes_from_the_yaml_and_the_flag_overrides_it(tmp_path):
    shipped = default_space("cnn")
    assert load_search_spec(shipped).pick == "best_epoch"
    yaml = tmp_path / "cnn.yaml"
    yaml.write_text(shipped.read_text().replace("pick: best_epoch", "pick: final_mean"))
    assert load_search_spec(yaml).pick == "final_mean"
    from tune_pets.models import get_spec

    args = build_parser().parse_args(["cnn", "--search-space", str(yaml), "--pick", "best_epoch"])
    assert spec_from_args(args, get_spec("cnn")).pick == "best_epoch"
    yaml.write_text(shipped.read_text().replace("pick: best_epoch", "pick: median"))
    with pytest.raises(UserError, match=r"cnn.yaml: pick must be one of best_epoch, final_mean"):
        load_search_spec(yaml)
