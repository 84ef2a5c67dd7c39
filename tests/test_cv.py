"""Cross-validation: subject-level folds, metrics, no leakage, permutations, worker processes.

Most tests use ``model_double`` (the train API over a logistic regression, seconds per fit) to
check the plumbing; the tests marked ``real`` in their name run ``bids_siamfuse.model.train``
itself (sloppy mode, few epochs). The accuracy evidence of the real network on a larger cohort
is in ``test_group.py`` (``-m slow``).
"""

from __future__ import annotations

import dataclasses

import model_double as md
import numpy as np
import pytest

from bids_siamfuse.errors import DataError, UsageError
from bids_siamfuse.model import cv
from bids_siamfuse.model.baselines import (
    BASELINE_C_GRID,
    BASELINE_INNER_FOLDS,
    BASELINES,
    baseline_scores,
    region_features,
    tune_baseline_c,
)
from bids_siamfuse.model.folds import (
    check_foldable,
    shuffle_subject_labels,
    subject_folds,
    subject_labels,
    task_seed,
)
from bids_siamfuse.model.metrics import (
    LEVELS,
    compute_metrics,
    corrected_paired_test,
    reliability,
    roc_points,
    subject_scores,
    summarize,
)
from bids_siamfuse.model.options import TrainConfig
from bids_siamfuse.model.tasks import RELEVANCE_KEYS, plan_tasks, run_task
from bids_siamfuse.model.workers import (
    WorkerError,
    _physical_gpu,
    _raise_remote,
    default_threads,
    resolve_devices,
    run_tasks,
)


def toy_cohort(seed=0, sizes=(12, 10, 8)):
    """Subjects with 1-3 sessions each, classes of the given sizes (in subjects)."""
    rng = np.random.default_rng(seed)
    subjects, labels = [], []
    k = 0
    for c, n in enumerate(sizes):
        for _ in range(n):
            k += 1
            for _ in range(int(rng.integers(1, 4))):
                subjects.append(f"{k:03d}")
                labels.append(c)
    return np.array(subjects), np.array(labels)


# ----------------------------------------------------------------------------------------------
# folds and shuffles
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_folds", [2, 3, 5])
def test_subject_folds_keep_subjects_together_and_stratify(n_folds):
    subjects, labels = toy_cohort()
    folds = subject_folds(subjects, labels, n_folds, seed=7)
    assert set(folds) == set(range(n_folds))
    for s in np.unique(subjects):  # every session of a subject in one fold
        assert len(set(folds[subjects == s])) == 1
    uniq, first = np.unique(subjects, return_index=True)
    sub_fold, sub_label = folds[first], labels[first]
    for c in np.unique(labels):  # each class spread evenly over the folds (at subject level)
        per_fold = np.bincount(sub_fold[sub_label == c], minlength=n_folds)
        assert per_fold.max() - per_fold.min() <= 1
    sizes = np.bincount(sub_fold, minlength=n_folds)
    assert sizes.max() - sizes.min() <= 1


def test_subject_folds_are_seeded():
    subjects, labels = toy_cohort()
    a = subject_folds(subjects, labels, 4, seed=1)
    assert np.array_equal(a, subject_folds(subjects, labels, 4, seed=1))
    assert not np.array_equal(a, subject_folds(subjects, labels, 4, seed=2))
    # row order does not matter: a subject's fold depends on the subject, not the row
    order = np.random.default_rng(0).permutation(len(subjects))
    b = subject_folds(subjects[order], labels[order], 4, seed=1)
    assert np.array_equal(b, a[order])


def test_shuffle_subject_labels_moves_whole_subjects():
    subjects, labels = toy_cohort()
    shuffled = shuffle_subject_labels(subjects, labels, seed=3)
    for s in np.unique(subjects):
        assert len(set(shuffled[subjects == s])) == 1
    _, first = np.unique(subjects, return_index=True)
    assert sorted(shuffled[first]) == sorted(labels[first])  # class sizes (subjects) kept
    assert not np.array_equal(shuffled, labels)


def test_foldability_checks():
    subjects, labels = toy_cohort(sizes=(6, 3))
    check_foldable(subjects, labels, 3, ("CN", "AD"))
    with pytest.raises(DataError, match="AD has 3 subject"):
        check_foldable(subjects, labels, 4, ("CN", "AD"))
    with pytest.raises(UsageError):
        check_foldable(subjects, labels, 1, ("CN", "AD"))
    bad = labels.copy()
    bad[np.flatnonzero(subjects == subjects[0])[-1]] = 1 - bad[0]
    if (subjects == subjects[0]).sum() > 1:
        with pytest.raises(DataError, match="sessions of different classes"):
            subject_labels(subjects, bad)


def test_task_seeds_are_distinct_and_stable():
    seeds = {task_seed(42, 0, p, r, f) for p in range(3) for r in range(3) for f in range(5)}
    assert len(seeds) == 45
    assert task_seed(42, 0, 1, 2, 3) == task_seed(42, 0, 1, 2, 3)
    assert task_seed(42, 1) != task_seed(43, 1)


# ----------------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------------


def test_binary_metrics_by_hand():
    # 4 CN (0), 6 AD (1); predictions: CN -> 3 right 1 wrong; AD -> 4 right 2 wrong
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    p_ad = np.array([0.1, 0.2, 0.3, 0.8, 0.9, 0.7, 0.6, 0.55, 0.4, 0.45])
    scores = np.stack([1 - p_ad, p_ad], 1)
    m = compute_metrics(y, scores, 2)
    assert m["sensitivity"] == pytest.approx(4 / 6)
    assert m["specificity"] == pytest.approx(3 / 4)
    assert m["balanced_accuracy"] == pytest.approx((4 / 6 + 3 / 4) / 2)
    assert m["precision"] == pytest.approx(4 / 5)
    assert m["f1"] == pytest.approx(2 * 4 / (2 * 4 + 1 + 2))
    # AUC: pairs (AD, CN) ranked right: count by hand
    pairs = sum((a > c) + 0.5 * (a == c) for a in p_ad[y == 1] for c in p_ad[y == 0])
    assert m["auc"] == pytest.approx(pairs / 24)
    # one class only in the fold: AUC undefined, not a crash
    assert np.isnan(compute_metrics(y[:4], scores[:4], 2)["auc"])


def test_multiclass_metrics_are_macro_averages():
    from sklearn.metrics import balanced_accuracy_score, f1_score, precision_score, roc_auc_score

    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 10)
    scores = rng.dirichlet([1, 1, 1], 30) + np.eye(3)[y] * 0.4
    scores /= scores.sum(1, keepdims=True)
    m = compute_metrics(y, scores, 3)
    pred = scores.argmax(1)
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["sensitivity"] == pytest.approx(m["balanced_accuracy"])
    assert m["precision"] == pytest.approx(precision_score(y, pred, average="macro"))
    assert m["f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["auc"] == pytest.approx(roc_auc_score(y, scores, multi_class="ovr"))
    spec = np.mean([((pred != c) & (y != c)).sum() / (y != c).sum() for c in range(3)])
    assert m["specificity"] == pytest.approx(spec)
    rows = roc_points(y, scores, ("CN", "MCI", "AD"))
    assert {r["class"] for r in rows} == {"CN", "MCI", "AD"}


# ----------------------------------------------------------------------------------------------
# nothing fit on the test fold
# ----------------------------------------------------------------------------------------------


def _poison(data, rows):
    """The data with the given rows' intensities wrecked and their labels flipped."""
    gm, pet, labels = data.gm.copy(), data.pet.copy(), data.labels.copy()
    rng = np.random.default_rng(0)
    gm[rows] = gm[rows] * 50 + rng.normal(0, 5, gm[rows].shape)
    pet[rows] = pet[rows][:, ::-1] * 20
    labels[rows] = 1 - labels[rows]
    return dataclasses.replace(data, gm=gm, pet=pet, labels=labels)


def test_fold_model_never_sees_test_fold_double(cohort):
    tasks, _ = plan_tasks(cohort, folds=3, repeats=1, seed=5, final_model=False)
    task = tasks[0]
    fitted = []

    def fit(train, config):
        model = md.fit(train, config)
        fitted.append(model)
        return model

    clean = run_task(cohort, task, fit=fit, config=TrainConfig(), device="cpu")
    poisoned = run_task(
        _poison(cohort, task.test_index),
        task,
        fit=fit,
        config=TrainConfig(),
        device="cpu",
    )
    test_subjects = set(cohort.subjects[task.test_index])
    assert not fitted[0].seen_subjects & test_subjects
    assert np.array_equal(fitted[0].coef, fitted[1].coef)
    for k in RELEVANCE_KEYS:
        assert np.array_equal(clean["relevance"][k], poisoned["relevance"][k])
    assert clean["history"] == poisoned["history"]


def test_fold_model_never_sees_test_fold_real(cohort):
    """The real network, trained on fold 1's training rows, is bit-identical whatever the
    test rows hold (intensities wrecked, labels flipped)."""
    from bids_siamfuse.model import train

    tasks, _ = plan_tasks(cohort, folds=3, repeats=1, seed=5, final_model=False)
    task = tasks[0]
    fitted = []

    def fit(data, config):
        model = train.fit(data, config)
        fitted.append(model)
        return model

    config = TrainConfig(epochs=2, sloppy=True)
    for data in (cohort, _poison(cohort, task.test_index)):
        run_tasks(
            data,
            [task],
            ["cpu"],
            fit=fit,
            config=config,
            threads=1,
        )
    (ta, ma), (tb, mb) = fitted[0].state(), fitted[1].state()
    assert ta.keys() == tb.keys()
    for k in ta:
        assert np.array_equal(ta[k], tb[k]), k
    assert fitted[0].history == fitted[1].history
    assert ma["standardizer"] == mb["standardizer"]


def test_baselines_fit_on_training_rows_only(cohort):
    feats = region_features(cohort)
    x = np.concatenate([feats["gm"], feats["pet"]], 1)
    y = cohort.labels
    tr, te = np.arange(0, 20), np.arange(20, len(y))
    for kind in ("svm", "logreg"):
        a = baseline_scores(kind, x[tr], y[tr], x[te], 2, 0)
        x2 = x.copy()
        x2[te[:3]] *= 100  # wreck three test rows: the others' scores must not move
        b = baseline_scores(kind, x[tr], y[tr], x2[te], 2, 0)
        assert np.array_equal(a[3:], b[3:])
        assert np.allclose(a.sum(1), 1)


# ----------------------------------------------------------------------------------------------
# the whole CV: separation, chance, a leak the chance test would catch, permutations
# ----------------------------------------------------------------------------------------------


def _cv(data, **kw):
    kw.setdefault("folds", 3)
    kw.setdefault("seed", 11)
    return cv.cross_validate(data, fit=md.fit, **kw)


def test_cv_separates_strong_effect_and_shuffles_score_chance(cohort):
    res = _cv(cohort, permutations=6, final_model=False)
    assert res.mean_balanced_accuracy() >= 0.9
    assert res.summary["logreg_both"]["balanced_accuracy"]["mean"] >= 0.8
    null = np.array([r[cv.MODEL_METHOD] for r in res.permutations])
    assert null.mean() <= 0.7, null  # chance is 0.5 (SD ~0.1 per rerun with 24 subjects)
    assert res.p_values[cv.MODEL_METHOD] == pytest.approx(1 / 7)
    # every session tested exactly once per method and repeat
    preds = [p for p in res.predictions if p["method"] == cv.MODEL_METHOD]
    assert len(preds) == len(cohort)
    keys = {(p["participant_id"], p["session"]) for p in preds}
    assert len(keys) == len(cohort)
    rows = [m for m in res.metrics if m["method"] == cv.MODEL_METHOD]
    sessions = [m for m in rows if m["level"] == "session"]
    assert sum(m["n_test"] for m in sessions) == len(cohort)
    subjects = [m for m in rows if m["level"] == "subject"]
    assert sum(m["n_test"] for m in subjects) == len(np.unique(cohort.subjects))


def test_a_leak_would_fail_the_chance_test(cohort, monkeypatch):
    """Negative control: if the test rows were in the training set, shuffled labels would
    score far above chance, so the chance test above has the power to catch a leak."""
    plan = plan_tasks

    def leaky(*args, **kwargs):
        tasks, assignment = plan(*args, **kwargs)
        everyone = np.arange(len(cohort))
        return [dataclasses.replace(t, train_index=everyone) for t in tasks], assignment

    monkeypatch.setattr(cv, "plan_tasks", leaky)
    res = _cv(cohort, permutations=3, final_model=False, baselines=False)
    null = np.array([r[cv.MODEL_METHOD] for r in res.permutations])
    assert null.mean() >= 0.9


def test_repeats_use_different_folds(cohort):
    res = _cv(cohort, repeats=2, final_model=False, baselines=False)
    a, b = res.folds[(0, 0)], res.folds[(0, 1)]
    assert not np.array_equal(a, b)
    rows = [m for m in res.metrics if m["method"] == cv.MODEL_METHOD]
    assert len(rows) == 6 * len(LEVELS)
    assert res.summary[cv.MODEL_METHOD]["balanced_accuracy"]["n"] == 6


def test_permutations_rerun_the_first_repeat_and_compare_with_it(cohort):
    """Issue 16: a rerun repeats one repeat's CV (10 x 5 + 100 permutations = 551 fits, not
    5051), and the p-value compares it with the first repeat's score, not the mean over all."""
    tasks, assignment = plan_tasks(cohort, folds=3, repeats=4, seed=5, permutations=2)
    kinds = [(t.perm, t.repeat) for t in tasks if t.test_index.size]
    assert len(kinds) == 4 * 3 + 2 * 3
    assert {r for p, r in kinds if p} == {0}
    assert set(assignment) == {(0, r) for r in range(4)} | {(1, 0), (2, 0)}
    res = _cv(cohort, repeats=2, permutations=4, final_model=False, baselines=False)
    first = [
        m["balanced_accuracy"]
        for m in res.metrics
        if m["method"] == cv.MODEL_METHOD and m["level"] == "subject" and m["repeat"] == 1
    ]
    assert len(first) == 3
    observed = res.permutation_observed[cv.MODEL_METHOD]
    assert observed == pytest.approx(np.mean(first))
    null = np.array([r[cv.MODEL_METHOD] for r in res.permutations])
    assert len(null) == 4
    expected = (1 + np.sum(null >= observed - 1e-12)) / 5
    assert res.p_values[cv.MODEL_METHOD] == pytest.approx(expected)


# ----------------------------------------------------------------------------------------------
# worker processes (CPU ranks): same results, errors reported
# ----------------------------------------------------------------------------------------------


def test_two_worker_processes_give_the_same_results(cohort):
    kw = {"permutations": 1, "threads": 1}
    one = _cv(cohort, devices=["cpu"], **kw)
    two = _cv(cohort, devices=["cpu", "cpu"], **kw)
    assert one.metrics == two.metrics
    assert one.predictions == two.predictions
    assert one.permutations == two.permutations
    assert one.history == two.history
    for k in one.final["tensors"]:
        assert np.array_equal(one.final["tensors"][k], two.final["tensors"][k])


def test_two_worker_processes_real_network(cohort):
    """The real network gives bit-identical folds in this process and in two CPU ranks."""
    kw = {
        "folds": 2,
        "seed": 3,
        "config": TrainConfig(epochs=1, sloppy=True),
        "threads": 1,
        "baselines": False,
        "final_model": False,
    }
    one = cv.cross_validate(cohort, devices=["cpu"], **kw)
    two = cv.cross_validate(cohort, devices=["cpu", "cpu"], **kw)
    assert one.predictions == two.predictions
    assert one.history == two.history
    for k in RELEVANCE_KEYS:
        assert np.array_equal(one.relevance[k], two.relevance[k])


def test_worker_failure_is_reported(cohort):
    with pytest.raises(WorkerError, match="boom") as info:
        cv.cross_validate(
            cohort,
            folds=2,
            fit=md.fit_boom,
            devices=["cpu", "cpu"],
            threads=1,
            baselines=False,
        )
    assert "worker traceback" in str(info.value) and "model_double.py" in str(info.value)


def test_the_double_implements_the_engine_protocols(cohort):
    """The group-level tests' double is a typed stand-in (tasks.Fit / tasks.Fitted), so the
    cross-validation runs it through the same contract as the real network."""
    from bids_siamfuse.model.tasks import Fit, Fitted

    assert isinstance(md.fit, Fit)
    model = md.fit(cohort, TrainConfig(epochs=1))
    assert isinstance(model, Fitted)
    assert not isinstance(object(), Fitted)


def test_worker_errors_keep_their_exit_code():
    with pytest.raises(DataError, match="bad region"):
        _raise_remote("cpu", "fold 1", ("DataError", "bad region", "tb"))


def test_resolve_devices_on_cpu():
    assert resolve_devices("cpu") == ["cpu"]
    assert resolve_devices("cpu", cpu_workers=3) == ["cpu", "cpu", "cpu"]
    assert default_threads(["cpu", "cpu"], 0) >= 1
    # CPU threads are explicit (an exported OMP_NUM_THREADS=1 must not decide them)
    assert default_threads(["cpu"], 0, nprocs=6) == 6
    assert default_threads(["cpu"], 0, nprocs=32) == 8
    assert default_threads(["cpu"] * 3, 0, nprocs=6) == 2
    assert default_threads(["cpu"], 3, nprocs=6) == 3
    assert default_threads(["cpu"], 9, nprocs=4) == 4  # never more threads than --nprocs
    assert default_threads(["cuda:0", "cuda:1"], 0, nprocs=6) is None
    import torch

    if not torch.cuda.is_available():
        assert resolve_devices("auto") == ["cpu"]
        with pytest.raises(UsageError, match="no CUDA"):
            resolve_devices("cuda")


def test_workers_per_gpu(monkeypatch):
    """--workers-per-gpu N: N worker processes per card, one per card first; the CLI flag
    reaches the resolved devices (GPUs faked: the machine's CUDA is not needed)."""
    import torch

    from bids_siamfuse.cli.parser import parse_args
    from bids_siamfuse.config import resolve

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_devices("cuda", per_gpu=2) == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    assert resolve_devices("cuda", gpus=1, per_gpu=3) == ["cuda:0"] * 3
    assert resolve_devices("cuda:1", per_gpu=2) == ["cuda:1", "cuda:1"]
    assert resolve_devices("cpu", per_gpu=4) == ["cpu"]  # CPU workers: --cpu-workers
    settings = parse_args(["/d", "/o", "group", "--device", "cuda", "--workers-per-gpu", "3"])
    assert settings.model.workers_per_gpu == 3
    assert resolve(settings).devices == ("cuda:0", "cuda:1") * 3
    # the default leaves the recorded settings as they were
    assert "workers_per_gpu" not in parse_args(["/d", "/o", "group"]).as_dict()["model"]


def test_resolve_decides_device_threads_and_training_once():
    """config.resolve: the group level gets its worker devices, threads and one TrainConfig
    (recorded fields = the run's settings); a participant run without a model resolves no
    device (``--device cuda`` is not refused there); ``cuda`` without a GPU is exit 64."""
    import torch

    from bids_siamfuse.config import Settings, resolve

    def settings(level, **cli):
        base = {"bids_dir": "/nonexistent", "output_dir": "/nonexistent/out"}
        return Settings.from_sources({}, {**base, "analysis_level": level, **cli})

    group = resolve(settings("group", device="cpu", nprocs=6, epochs=7, sloppy=True))
    assert group.devices == ("cpu",) and group.device == "cpu"
    assert (group.nprocs, group.omp_nthreads) == (6, 6)
    assert group.train.epochs == 7 and group.train.sloppy is True
    assert list(group.train.run_settings()) == [
        "epochs",
        "batch_size",
        "learning_rate",
        "early_stop_loss",
        "patience",
        "val_fraction",
        "sloppy",
        "deterministic",
        "fusion",
        "gate",
    ]
    part = resolve(settings("participant", device="cuda", nprocs=2, omp_nthreads=1))
    assert (part.device, part.nprocs, part.omp_nthreads, part.train) == ("cpu", 2, 1, None)
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no CUDA"):
            resolve(settings("group", device="cuda"))


def test_gpu_workers_see_only_their_gpu(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert _physical_gpu("cuda:1") == "1" and _physical_gpu("cpu") is None
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    assert _physical_gpu("cuda:0") == "4" and _physical_gpu("cuda:1") == "6"


# ----------------------------------------------------------------------------------------------
# issue 12: statistics, subject level, calibration, ablations, tuned baselines
# ----------------------------------------------------------------------------------------------


def test_corrected_interval_and_paired_test_by_hand():
    from scipy.stats import t as student_t

    values = [0.8, 0.9, 0.7, 0.85, 0.75]
    s = summarize(values, test_train_ratio=0.25)
    sd = np.std(values, ddof=1)
    half = student_t.ppf(0.975, 4) * np.sqrt((1 / 5 + 0.25) * sd**2)
    assert s["ci_low"] == pytest.approx(np.mean(values) - half)
    assert s["ci_high"] == pytest.approx(np.mean(values) + half)
    # wider than the naive interval that ignores the overlap of the training sets
    assert half > student_t.ppf(0.975, 4) * sd / np.sqrt(5)
    assert summarize(values)["ci_low"] is None  # no ratio, no interval
    d = [0.1, 0.2, 0.15, 0.05, 0.1]
    test = corrected_paired_test(d, 0.25)
    t = np.mean(d) / np.sqrt((1 / 5 + 0.25) * np.var(d, ddof=1))
    assert test["t"] == pytest.approx(t)
    assert test["p_value"] == pytest.approx(2 * student_t.sf(t, 4))
    assert corrected_paired_test([0.1, -0.1, 0.1, -0.1], 0.25)["p_value"] == pytest.approx(1)


def test_subject_scores_average_sessions():
    subjects = np.array(["b", "a", "b", "c"])
    y = np.array([1, 0, 1, 0])
    scores = np.array([[0.2, 0.8], [0.9, 0.1], [0.6, 0.4], [0.5, 0.5]])
    uniq, labels, out = subject_scores(subjects, y, scores)
    assert uniq.tolist() == ["a", "b", "c"] and labels.tolist() == [0, 1, 0]
    assert np.allclose(out[1], [0.4, 0.6])


def test_brier_and_reliability():
    y = np.array([0, 0, 1, 1])
    scores = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.05, 0.95]])
    m = compute_metrics(y, scores, 2)
    assert m["brier"] == pytest.approx(np.mean([0.01, 0.16, 0.09, 0.0025]))
    rows = reliability(y, scores, n_bins=2)
    assert [r["n"] for r in rows] == [2, 2]
    assert rows[0]["observed"] == 0 and rows[1]["observed"] == 1
    assert rows[0]["mean_predicted"] == pytest.approx(0.25)


def test_baseline_regularisation_is_tuned_inside_the_training_rows(monkeypatch):
    rng = np.random.default_rng(0)
    subjects = np.repeat(np.arange(30), 2).astype(str)  # two sessions per subject
    y = np.repeat(np.arange(30) % 2, 2)
    x = rng.standard_normal((60, 40))
    x[:, 0] += 3 * y  # one informative feature among 40
    seen = []
    from sklearn import model_selection

    class Spy(model_selection.StratifiedGroupKFold):
        def split(self, X, y=None, groups=None):
            for tr, te in super().split(X, y, groups):
                seen.append((set(groups[tr]), set(groups[te])))
                yield tr, te

    monkeypatch.setattr(model_selection, "StratifiedGroupKFold", Spy)
    c = tune_baseline_c("logreg", x, y, subjects, seed=1)
    assert c in BASELINE_C_GRID
    assert len(seen) == BASELINE_INNER_FOLDS
    assert all(not (a & b) for a, b in seen)  # sessions of a subject on one side
    scores = baseline_scores("svm", x, y, x[:4], 2, 1, groups=subjects)
    assert scores.shape == (4, 2)


def test_cv_tables_with_ablations_levels_and_statistics():
    from test_model_train import coupling_cohort

    data = coupling_cohort(12, seed=3)
    # two sessions for some subjects: subject level differs from session level
    extra = np.arange(0, len(data), 3)
    both = np.concatenate([np.arange(len(data)), extra])
    data = data.subset(both)
    data = dataclasses.replace(
        data, sessions=np.array(["1"] * (len(both) - len(extra)) + ["2"] * len(extra))
    )
    res = cv.cross_validate(
        data,
        folds=3,
        repeats=2,
        seed=5,
        permutations=2,
        fit=md.fit,
        final_model=False,
    )
    ablations = [cv.ABLATION_PREFIX + "mri_only", cv.ABLATION_PREFIX + "pet_only"]
    assert res.methods == [cv.MODEL_METHOD, *ablations, *BASELINES]
    assert {r["level"] for r in res.metrics} == {"subject", "session"}
    n_sub = len(np.unique(data.subjects))
    for level, n in (("subject", n_sub), ("session", len(data))):
        rows = [r for r in res.metrics if r["level"] == level and r["method"] == cv.MODEL_METHOD]
        assert len(rows) == 6 and sum(r["n_test"] for r in rows) == 2 * n
    s = res.summary[cv.MODEL_METHOD]["balanced_accuracy"]
    assert s["ci_low"] < s["mean"] < s["ci_high"] and s["n"] == 6
    assert set(res.summary_session) == set(res.summary)
    assert {(r["method"], r["repeat"]) for r in res.per_repeat if r["level"] == "subject"} == {
        (m, k) for m in res.methods for k in (1, 2)
    }
    best = [c for c in res.comparisons if c["best_baseline"]]
    assert {c["metric"] for c in best} == {"balanced_accuracy", "auc", "brier"}
    assert best[0]["versus"] in BASELINES and best[0]["n"] == 6
    assert set(res.p_values) == set(res.methods)
    assert {r["method"] for r in res.calibration} == set(res.methods)
    assert len(res.training) == 6 * data.layout.n_regions
    assert {"kept_epoch", "trained", "val_hinge_improvement"} <= set(res.training[0])
