"""The Tune search algorithm and trial scheduler of a search (``search.algorithm``, ``scheduler.type``).

The Ray-specific subclasses they use (:class:`~megaray.tune.ray_compat.TPESearch`,
:class:`~megaray.tune.ray_compat.ResumableASHA`) live in :mod:`megaray.tune.ray_compat` with
the Ray issue each works around.
"""

from __future__ import annotations

from typing import Any

from megaray.config import ConfigError
from megaray.tune.config import TuneSearch


def search_algorithm(search: TuneSearch) -> Any:
    """The Tune search algorithm for ``search.algorithm``: ``random``/``grid`` = Tune's
    ``BasicVariantGenerator``, ``optuna`` = Optuna TPE.

    Raises:
        ConfigError: ``optuna`` without the optuna package installed.
    """
    s = search.config.search
    if s.algorithm == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise ConfigError("search.algorithm 'optuna' needs the optuna package: pip install optuna") from None
        from megaray.tune.ray_compat import TPESearch

        return TPESearch(seed=s.seed)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # A SearchAlgorithm ignores TuneConfig.max_concurrent_trials: give it the limit itself.
    return BasicVariantGenerator(max_concurrent=s.max_concurrent_trials or 0, random_state=s.seed)


def scheduler(search: TuneSearch) -> Any:
    """The Tune trial scheduler for ``scheduler.type``: ``fifo`` or ``asha`` (ASHA, Li et al. 2020,
    "A System for Massively Parallel Hyperparameter Tuning"); ``pbt`` is rejected at load."""
    from ray.tune.schedulers import FIFOScheduler

    from megaray.tune.ray_compat import ResumableASHA

    s = search.config.scheduler
    if s.type == "asha":
        # stop_last_trials=False: a trial that survives the rungs runs to train.max_steps and ends
        # by itself (its Train run finishes and closes its MLflow run).
        return ResumableASHA(
            time_attr=s.time_attr,
            max_t=s.max_t or search.max_steps(),
            grace_period=s.grace_period,
            reduction_factor=s.reduction_factor,
            brackets=s.brackets,
            stop_last_trials=False,
        )
    return FIFOScheduler()
