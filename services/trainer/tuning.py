"""The search behind `tuneline run --tune N --budget MINUTES` (plan.tuning): a small seeded search over a
recipe's tunable settings, scored on the validation split, within a time budget.

Protocol (the test set is never read: the trainer holds only the train and validation splits):
- trial k trains the recipe with the trial's settings on the train split, evaluating on the validation
  split as any training does; its score is the best checkpoint's validation metric (macro-F1 for a
  single-label classifier), the checkpoint the final training would export with those settings;
- trial 1 is the recipe's own settings, the others distinct points of the search space drawn at random
  with the plan's seed (so a redelivery plans the same trials in the same order);
- a trial is started only while the budget allows it: the time it should take is estimated from the
  trials so far (seconds per training example-token, times the trial's steps x batch x max_length) and
  must fit in what is left of the budget; a trial that runs past the budget anyway is cut off
  (`cut_off`, no score). Trial 1 always runs: it is the training a run without --tune would do;
- a trial that diverges (a learning rate too high) is recorded as `diverged` and the search goes on;
- the best score wins (ties: the earlier trial, so the recipe's own settings win a tie), and the
  final model is the winner's training, not a second one: its checkpoints are taken over as the final
  training's work directory (`adopt_winner`), whose ordinary path (resume, training.completed) then
  resumes at the trial's last step, loads its best checkpoint and exports it. The trial trained those
  settings on the same rows with the same seed, so training again would only repeat it. When the
  trial's checkpoints are gone (a recorded trial from an attempt whose files were lost), it trains.

Crash safety: each finished trial is written (atomically) to the job's work directory before its
`training.trial_completed` is published, with an id derived from the trigger and the trial number. A
redelivered trigger reads the trials already done, publishes their events again under the same ids
(the bus drops them as duplicates) and runs only the trials left; a trial interrupted mid-way resumes
from its own checkpoints. The budget counts the recorded trials' wall time, so a restart does not
grant a fresh budget.

The search space (`search_space`): per tunable recipe field, candidates relative to the recipe's value,
so a change of a recipe's defaults moves the search with it; a field the plan sets explicitly is held
(not searched). A field the Recipe model does not have is left out. `plan.tuning.space`, when given, is
the whole space: the fields it names (any of TUNABLE) with its candidates; a field outside TUNABLE is refused
(`training.tuning_invalid`).
"""

from __future__ import annotations

import itertools
import json
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from services.common.logging import get_logger
from services.trainer.recipes import Recipe

log = get_logger(__name__)

TRIALS_DIR = "trials"


class TuningError(ValueError):
    """The plan's search space names a field the recipe does not tune, or a value it refuses."""

    reason_code = "training.tuning_invalid"


def _scaled(value: float, factors: tuple[float, ...]) -> list[float]:
    return [float(f"{value * f:.3g}") for f in factors]


_ENCODER_CLASSIFIERS = ("sequence_classification", "multi_label_classification")
# Recipe field -> (in the default space of this recipe?, default candidates for it). Candidates are relative to the
# recipe's own value, which is always among them.
TUNABLE: dict[str, tuple[Callable[[Recipe], bool], Callable[[Recipe], list[Any]]]] = {
    "learning_rate": (lambda r: True, lambda r: _scaled(r.learning_rate, (0.5, 1.0, 2.0))),
    "epochs": (lambda r: True, lambda r: _scaled(r.epochs, (1.0, 2.0))),
    "lora_r": (lambda r: getattr(r, "method", "lora") in ("lora", "qlora"),
               lambda r: sorted({r.lora_r, r.lora_r * 2})),
    "max_length": (lambda r: r.task != "chat_sft", lambda r: sorted({r.max_length, min(r.max_length * 2, 512)})),
    "batch_size": (lambda r: False, lambda r: sorted({max(1, r.batch_size // 2), r.batch_size})),
    "warmup_ratio": (lambda r: False, lambda r: sorted({r.warmup_ratio, 0.0})),
    "weight_decay": (lambda r: False, lambda r: sorted({r.weight_decay, 0.0})),
    "lora_dropout": (lambda r: False, lambda r: sorted({r.lora_dropout, 0.0})),
    "pooling": (lambda r: False, lambda r: ["mean", "cls"]),
    "truncation": (lambda r: r.task in _ENCODER_CLASSIFIERS, lambda r: sorted({getattr(r, "truncation", "head"), "head_tail"})),
    "layer_lr_decay": (lambda r: False, lambda r: sorted({getattr(r, "layer_lr_decay", 1.0), 0.9})),
    "method": (lambda r: False, lambda r: [r.method]),
    "patience": (lambda r: False, lambda r: [r.patience]),
}
# Recipe fields whose value follows a tuned one (LoRA's usual alpha = 2r).
COUPLED: dict[str, Callable[[Recipe, Any], dict[str, Any]]] = {
    "lora_r": lambda r, v: {"lora_alpha": int(v) * max(1, r.lora_alpha // max(1, r.lora_r))},
}


def search_space(recipe: Recipe, overrides: dict[str, list[Any]] | None = None,
                 fixed: set[str] | frozenset[str] = frozenset()) -> dict[str, list[Any]]:
    """Field -> candidate values for `recipe`. With `overrides` (the plan's tuning space): those fields and
    candidates, nothing else. Without: TUNABLE's default fields that apply to the recipe and have more
    than one candidate, less the `fixed` ones (fields the plan set explicitly: a user who says
    `--set learning_rate=...` means it). Every candidate is checked against the recipe (a value the
    recipe refuses is an error naming the field and the value)."""
    tunable = sorted(n for n in TUNABLE if n in Recipe.model_fields)
    space = {name: list(dict.fromkeys(TUNABLE[name][1](recipe))) for name in tunable
             if TUNABLE[name][0](recipe) and name not in fixed}
    space = {name: values for name, values in space.items() if len(values) > 1}
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(tunable))
    if unknown:
        raise TuningError(f"tuning space: {', '.join(unknown)} cannot be tuned; the tunable fields are: "
                          f"{', '.join(tunable)}")
    if overrides:
        space = {}
    for name, values in overrides.items():
        if not values:
            raise TuningError(f"tuning space: no candidate values for {name}")
        space[name] = list(dict.fromkeys(_hashable(v) for v in values))
    for name, values in space.items():
        for value in values:
            settings_of(recipe, {name: value})  # raises TuningError for a refused value
    return space


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def settings_of(recipe: Recipe, trial: dict[str, Any]) -> Recipe:
    """`recipe` with a trial's settings (and the fields coupled to them) applied."""
    fields = dict(trial)
    for name, value in trial.items():
        if name in COUPLED:
            fields = {**COUPLED[name](recipe, value), **fields}
    try:
        return Recipe.model_validate({**recipe.model_dump(), **fields})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'recipe'}: {e['msg']}" for e in exc.errors())
        raise TuningError(f"tuning space: {trial} is refused by recipe {recipe.name!r}: {problems}") from None


def plan_trials(recipe: Recipe, space: dict[str, list[Any]], n: int, seed: int) -> list[dict[str, Any]]:
    """Up to `n` distinct trials: the recipe's own settings first, then points of the space drawn at
    random with `seed` (the whole grid when it has no more than n points). Deterministic."""
    names = sorted(space)
    own = {name: getattr(recipe, name) for name in names}
    grid = [dict(zip(names, combo)) for combo in itertools.product(*(space[nm] for nm in names))]
    others = [g for g in grid if g != own]
    random.Random(seed).shuffle(others)
    return [own, *others][:n]


def cost_units(recipe: Recipe, train_rows: int) -> float:
    """What a training's time is proportional to: examples trained on x tokens per example."""
    return float(recipe.steps_for(train_rows) * min(recipe.batch_size, max(1, train_rows)) * recipe.max_length)


def estimate_s(done: list[tuple[float, float]], units: float) -> float | None:
    """Seconds a trial of `units` should take, from the (units, wall_s) of the trials so far (None: none yet)."""
    measured = [(u, w) for u, w in done if u > 0 and w > 0]
    if not measured:
        return None
    return units * sum(w for _, w in measured) / sum(u for u, _ in measured)


def fits(spent_s: float, estimate: float | None, budget_s: float) -> bool:
    """May a trial expected to take `estimate` seconds start with `spent_s` of `budget_s` used?"""
    if estimate is None:
        return spent_s < budget_s
    return spent_s + estimate <= budget_s


def is_better(metric: float | None, best: float | None) -> bool:
    return metric is not None and (best is None or metric > best)


@dataclass(frozen=True)
class TrialResult:
    trial: int
    settings: dict[str, Any]
    status: str                      # completed | diverged | cut_off
    wall_s: float
    units: float
    metric_name: str | None = None
    metric: float | None = None
    best_step: int | None = None
    steps: int = 0
    reason_code: str | None = None
    message: str | None = None


def trial_path(work_dir: Path, trial: int) -> Path:
    return work_dir / TRIALS_DIR / f"trial-{trial:03d}.json"


def trial_work_dir(work_dir: Path, trial: int) -> Path:
    return work_dir / TRIALS_DIR / f"trial-{trial:03d}"


def adopt_winner(work_dir: Path, trial: int) -> bool:
    """Copy trial `trial`'s checkpoints (its newest ones, LATEST and the best checkpoint) into `work_dir`, where
    the final training looks for a checkpoint to resume from. Each file is written atomically and LATEST last,
    so an attempt killed mid-copy leaves no pointer to a torn file. False (nothing copied) when the trial left
    no finished checkpoint, or the final training has a checkpoint of its own already (a redelivery after it
    started: that one is resumed)."""
    from services.trainer.local.engine import BEST, LATEST, atomic_write_bytes

    src = trial_work_dir(work_dir, trial)
    if (work_dir / LATEST).exists() or not (src / LATEST).is_file():
        return False
    files = [*sorted(src.glob("ckpt-*.pt")), src / BEST]
    for f in files:
        if f.is_file():
            atomic_write_bytes(work_dir / f.name, f.read_bytes())
    atomic_write_bytes(work_dir / LATEST, (src / LATEST).read_bytes())
    return True


def save_trial(work_dir: Path, result: TrialResult) -> None:
    from services.trainer.local.engine import atomic_write_bytes

    atomic_write_bytes(trial_path(work_dir, result.trial), json.dumps(asdict(result), default=list).encode())


def load_trials(work_dir: Path, planned: list[dict[str, Any]]) -> dict[int, TrialResult]:
    """The trials a previous attempt finished (only those whose settings are still the planned ones)."""
    out: dict[int, TrialResult] = {}
    for k, settings in enumerate(planned, start=1):
        try:
            data = json.loads(trial_path(work_dir, k).read_text())
        except (OSError, ValueError):
            continue
        if json.loads(json.dumps(settings, default=list)) == data.get("settings"):
            out[k] = TrialResult(**data)
    return out


class TrialControl:
    """The job's Control (cancel, pause, the service's time limit) with the budget's end as a deadline of its own."""

    def __init__(self, parent, deadline: float | None) -> None:
        self.parent = parent
        self.deadline = deadline

    def __getattr__(self, name: str):
        return getattr(self.parent, name)

    @property
    def budget_passed(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    @property
    def timed_out(self) -> bool:
        return self.parent.timed_out or self.budget_passed


@dataclass(frozen=True)
class SearchOutcome:
    trials: list[TrialResult]
    best: TrialResult | None
    stopped_by_budget: bool
    wall_s: float


TrainTrial = Callable[[int, Recipe, TrialControl], Awaitable[Any]]  # -> engine.TrainOutcome


async def run_search(
    recipe: Recipe,
    planned: list[dict[str, Any]],
    *,
    train_rows: int,
    budget_s: float,
    work_dir: Path,
    control,
    train_trial: TrainTrial,
    on_trial: Callable[[TrialResult, bool], Awaitable[None]],
) -> SearchOutcome:
    """Run the planned trials in order while the budget allows; `train_trial(k, recipe_k, control_k)`
    trains one (in a worker thread) and returns the engine's TrainOutcome; `on_trial(result, is_best)`
    publishes it. Trials recorded in `work_dir` by an earlier attempt are reported again, not rerun."""
    from services.trainer.local.engine import TrainingDiverged, TrainingTimedOut

    started = time.monotonic()
    done = load_trials(work_dir, planned)
    results: list[TrialResult] = []
    best: TrialResult | None = None
    stopped_by_budget = False
    for k, settings in enumerate(planned, start=1):
        trial_recipe = settings_of(recipe, settings)
        units = cost_units(trial_recipe, train_rows)
        result = done.get(k)
        if result is not None:
            log.info("trial_recorded_earlier", trial=k, status=result.status, metric=result.metric)
        else:
            spent = sum(r.wall_s for r in results)
            expected = estimate_s([(r.units, r.wall_s) for r in results if r.status == "completed"], units)
            if k > 1 and not fits(spent, expected, budget_s):
                log.info("tuning_budget_reached", trial=k, expected_s=expected, spent_s=round(spent, 2), budget_s=budget_s)
                stopped_by_budget = True
                break
            # trial 1 runs whatever the budget (it is the run's training without --tune); later ones stop at its end
            deadline = None if k == 1 else time.monotonic() + max(0.0, budget_s - spent)
            trial_control = TrialControl(control, deadline)
            log.info("trial_started", trial=k, settings=settings, expected_s=expected, spent_s=round(spent, 2))
            t0 = time.perf_counter()
            try:
                outcome = await train_trial(k, trial_recipe, trial_control)
                result = TrialResult(trial=k, settings=settings, status="completed", wall_s=time.perf_counter() - t0,
                                     units=units, metric_name=outcome.metric_name, metric=outcome.best_metric,
                                     best_step=outcome.best_step, steps=outcome.steps)
            except TrainingDiverged as exc:
                result = TrialResult(trial=k, settings=settings, status="diverged", wall_s=time.perf_counter() - t0,
                                     units=units, reason_code="training.diverged", message=str(exc)[:2000])
            except TrainingTimedOut as exc:
                if not trial_control.budget_passed or control.timed_out:
                    raise  # the job's own time limit: the run fails as timed out
                result = TrialResult(trial=k, settings=settings, status="cut_off", wall_s=time.perf_counter() - t0,
                                     units=units, reason_code="training.timeout",
                                     message=f"the tuning budget ran out during the trial ({exc})"[:2000])
            save_trial(work_dir, result)
        results.append(result)
        is_best = is_better(result.metric, best.metric if best else None)
        if is_best:
            best = result
        await on_trial(result, is_best)
        if result.status == "cut_off":
            stopped_by_budget = k < len(planned)
            break
    return SearchOutcome(trials=results, best=best, stopped_by_budget=stopped_by_budget,
                         wall_s=time.monotonic() - started)
