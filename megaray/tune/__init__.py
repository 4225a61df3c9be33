"""megaray.tune: hyperparameter search over megaray runs with Ray Tune (Train V2 pattern).

    from megaray.tune import load_tune_config, run_search
    search = load_tune_config("configs/tune/transformer.yaml")      # validate only (no Ray)
    result = run_search("configs/tune/transformer.yaml")            # run; resume=True continues it

Modules: ``config`` (the YAML, overrides, checks before any trial), ``space`` (distributions,
Tune domains), ``schedulers`` (search algorithm, ASHA), ``search`` (the Tune run, the trial
driver, MLflow parent), ``report`` (per-trial summary, table, plot), ``ray_compat`` (the Ray Tune
workarounds; the Train run's are in :mod:`megaray.train.ray_compat`). See docs/tune.md.
``run_search`` imports Ray Tune on first use.
"""

from megaray.tune.config import TuneSearch, TuneSearchConfig, load_tune_config
from megaray.tune.report import SearchResult, TrialSummary
from megaray.tune.space import Distribution

__all__ = [
    "Distribution",
    "TuneSearch",
    "TuneSearchConfig",
    "load_tune_config",
    "run_search",
    "SearchResult",
    "TrialSummary",
]


def __getattr__(name):
    if name == "run_search":
        from megaray.tune.search import run_search

        return run_search
    raise AttributeError(name)
