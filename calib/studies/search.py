"""Optuna searches that resume: a grid phase and a TPE phase.

Trials live in an Optuna storage; a rerun loads the study and evaluates only
what is missing, so an interrupted study (Ctrl-C, a killed process) resumes
without losing or repeating a completed trial.  Results are read back from the
storage and ordered by parameter value, never by completion order, so the
output does not depend on timing.
"""

from __future__ import annotations

import logging
from typing import Callable, Mapping

import optuna
from tqdm.auto import tqdm

__all__ = ["grid_search", "completed_grid", "quiet_optuna"]


def quiet_optuna() -> None:
    optuna.logging.set_verbosity(logging.WARNING)


def completed_grid(study: optuna.Study, param: str) -> dict[float, optuna.trial.FrozenTrial]:
    """Completed trials by value of ``param`` (the first completed trial wins a duplicate)."""
    done: dict[float, optuna.trial.FrozenTrial] = {}
    for t in sorted(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)),
                    key=lambda t: t.number):
        v = float(t.params[param])
        done.setdefault(v, t)
    return done


def grid_search(study_name: str, storage, param: str, values: list[float],
                objective: Callable[[float], tuple[float, Mapping[str, float]]], *, progress: bool = True,
                desc: str | None = None) -> dict[float, optuna.trial.FrozenTrial]:
    """Evaluate ``objective(value)`` at every grid value not yet completed in the study.

    ``objective`` returns ``(value_to_minimise, user_attrs)``.  Returns the
    completed trials keyed by parameter value (all of ``values``).
    """
    quiet_optuna()
    sampler = optuna.samplers.GridSampler({param: list(values)}, seed=0)
    study = optuna.create_study(study_name=study_name, storage=storage, sampler=sampler, direction="minimize",
                                load_if_exists=True)
    wanted = {float(v) for v in values}
    done = completed_grid(study, param)
    todo = [v for v in values if float(v) not in done]
    with tqdm(total=len(values), initial=len(values) - len(todo), desc=desc or study_name, unit="trial",
              disable=not progress, leave=False) as bar:
        for _ in range(3 * len(values)):  # bounded: every pass completes one trial or fails loudly
            if not todo:
                break
            waiting = {float(t.params.get(param, t.system_attrs.get("fixed_params", {}).get(param, -1)))
                       for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))}
            if float(todo[0]) not in waiting:  # enqueue fixes the order and avoids GridSampler repeats
                study.enqueue_trial({param: todo[0]})
            trial = study.ask()
            value = float(trial.suggest_float(param, min(values), max(values)))
            if value in done:  # a stale queued duplicate: record it as pruned, do not evaluate again
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                continue
            try:
                score, attrs = objective(value)
            except BaseException:
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                raise
            for k, a in attrs.items():
                trial.set_user_attr(k, a)
            study.tell(trial, score)
            done[value] = None  # reloaded from storage below
            todo = [v for v in todo if float(v) != value]
            bar.update(1)
    done = completed_grid(study, param)
    missing = wanted - set(done)
    if missing:
        raise RuntimeError(f"grid values never completed: {sorted(missing)}")
    return {v: done[v] for v in sorted(done) if v in wanted}
