"""`tuneline run`'s recipe, `--set` overrides and cleaning knobs, checked before anything is published:
a typo is an error at the prompt, not a `training.recipe_invalid` minutes later behind the queue."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import TypeAdapter, ValidationError

from contracts.common import CleaningSettings

CLEAN_PREFIX = "clean."


def split_overrides(settings: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """`--set` pairs as (recipe overrides, cleaning settings): `clean.FIELD=VALUE` sets a field of the
    plan's cleaning policy, every other name a recipe field."""
    recipe, cleaning = {}, {}
    for key, value in settings.items():
        if key.startswith(CLEAN_PREFIX):
            cleaning[key[len(CLEAN_PREFIX):]] = value
        else:
            recipe[key] = value
    return recipe, cleaning


def _field_problem(model, name: str, value: Any) -> str | None:
    field = model.model_fields[name]
    kind = Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
    try:
        TypeAdapter(kind).validate_python(value)
    except ValidationError as exc:
        return "; ".join(e["msg"] for e in exc.errors(include_url=False, include_input=False, include_context=False))
    return None


def recipe_problems(recipe: str | None, overrides: dict[str, Any]) -> list[str]:
    """Every problem with `--recipe` and the recipe `--set` fields, one line each (empty: fine). Field
    values are checked against the field's type and bounds; with a named recipe, also together with
    that recipe's other fields. Lists of valid names are given whole."""
    from services.trainer.recipes import RECIPES, Recipe

    problems = []
    if recipe is not None and recipe not in RECIPES:
        problems.append(f"--recipe: unknown recipe {recipe!r}; the recipes are: {', '.join(sorted(RECIPES))} "
                        "(`tuneline recipes` describes them)")
    settable = sorted(set(Recipe.model_fields) - {"name", "task"})
    for name, value in overrides.items():
        if name in ("name", "task"):
            problems.append(f"--set {name}: a recipe's {name} cannot be overridden; pick another --recipe")
        elif name not in Recipe.model_fields:
            problems.append(f"--set {name}: unknown recipe field; the fields are: {', '.join(settable)}; "
                            f"cleaning knobs are set as clean.FIELD ({', '.join(CLEAN_PREFIX + f for f in CleaningSettings.model_fields)})")
        elif (msg := _field_problem(Recipe, name, value)) is not None:
            problems.append(f"--set {name}={value!r}: {msg}")
    if not problems and recipe is not None and overrides:
        try:
            Recipe.model_validate({**RECIPES[recipe].model_dump(), **overrides})
        except ValidationError as exc:
            for e in exc.errors(include_url=False, include_input=False, include_context=False):
                problems.append(f"--set: recipe {recipe!r} with these overrides: {e['msg']}")
    return problems


def cleaning_problems(cleaning: dict[str, Any]) -> list[str]:
    """Every problem with the `--set clean.FIELD=VALUE` knobs, one line each."""
    problems = []
    fields = ", ".join(CLEAN_PREFIX + f for f in CleaningSettings.model_fields)
    for name, value in cleaning.items():
        if name not in CleaningSettings.model_fields:
            problems.append(f"--set {CLEAN_PREFIX}{name}: unknown cleaning knob; the knobs are: {fields}")
        elif (msg := _field_problem(CleaningSettings, name, value)) is not None:
            problems.append(f"--set {CLEAN_PREFIX}{name}={value!r}: {msg}")
    return problems


def with_min_per_class(cleaning: dict[str, Any], min_per_class: int | None) -> dict[str, Any]:
    """The cleaning knobs with `--min-per-class` among them (clean.min_per_class by its own option)."""
    return cleaning if min_per_class is None else {**cleaning, "min_per_class": min_per_class}


def min_per_class_problems(cleaning: dict[str, Any], min_per_class: int | None) -> list[str]:
    """What is wrong with `--min-per-class` (the `--set clean.` knobs are cleaning_problems' part)."""
    if min_per_class is None:
        return []
    if cleaning.get("min_per_class", min_per_class) != min_per_class:
        return [f"--min-per-class {min_per_class} and --set {CLEAN_PREFIX}min_per_class={cleaning['min_per_class']!r} "
                "disagree; give one of them"]
    msg = _field_problem(CleaningSettings, "min_per_class", min_per_class)
    return [f"--min-per-class {min_per_class}: {msg} (a label needs a train and a test row)"] if msg else []


DEFAULT_BUDGET_MINUTES = 30.0


def parse_tune_space(pairs: list[str] | None) -> dict[str, Any]:
    """`--tune-space FIELD=[V1,V2]` pairs as field -> candidates (a value that is not a JSON list is kept as
    given, for tuning_problems and the plan's validation to name)."""
    import json

    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, _, raw = pair.partition("=")
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw
    return out


def tuning_problems(trials: int | None, budget: float | None, space_pairs: list[str] | None,
                    backend: str = "local") -> list[str]:
    """What is wrong with `--tune`, `--budget` and `--tune-space`, one line each (their bounds are the
    plan's: RunPlan's validation names them too)."""
    from services.trainer.recipes import Recipe
    from services.trainer.tuning import TUNABLE

    if trials is None:
        return [f"{option}: applies with --tune N" for option, given in (("--budget", budget), ("--tune-space", space_pairs))
                if given is not None]
    problems = []
    if backend != "local":
        problems.append(f"--tune: tuning runs local trainings; a {backend} fine-tune is not tuned")
    tunable = sorted(n for n in TUNABLE if n in Recipe.model_fields)
    for pair in space_pairs or []:
        name, sep, raw = pair.partition("=")
        if not sep or not name:
            problems.append(f"--tune-space expects FIELD=[V1,V2,...], got {pair!r}")
            continue
        values = parse_tune_space([pair])[name]
        if name not in tunable:
            problems.append(f"--tune-space {name}: not a tunable field; the tunable fields are: {', '.join(tunable)}")
        elif not isinstance(values, list) or not values:
            problems.append(f"--tune-space {name}: give the candidates as a non-empty JSON list, e.g. {name}=[1,2]")
        else:
            problems += [f"--tune-space {name}={v!r}: {msg}" for v in values
                         if (msg := _field_problem(Recipe, name, v)) is not None]
    return problems


TARGET_CHARACTERS = "ASCII letters, digits, '-' and '_'"


def target_slug(target: str) -> str:
    """A target name made of the allowed characters that reads like `target`: accents dropped, every
    other run of characters a '-' ("Support Tickets (EU)" -> "support-tickets-eu")."""
    import re
    import unicodedata

    ascii_text = unicodedata.normalize("NFKD", target).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", ascii_text.lower()).strip("-")
    return slug or "target"


def target_problem(target: str) -> str | None:
    """Why `target` cannot name a deployment target (it becomes a NATS subject token), with a suggested
    name; None when it can."""
    import re

    if re.fullmatch(r"[A-Za-z0-9_-]+", target):
        return None
    return (f"--target {target!r}: a target name may hold only {TARGET_CHARACTERS} (it is part of a bus subject); "
            f"try --target {target_slug(target)}")
