"""megaray.tune: hyperparameter search over megaray runs with Ray Tune (Train V2 pattern).

    from megaray.tune import load_tune_config, run_search
    search = load_tune_config("configs/tune/transformer.yaml")      # validate only (no Ray)
    result = run_search("configs/tune/transformer.yaml")            # run; resume=True continues it

See docs/tune.md. ``run_search`` and ``SearchResult`` import Ray Tune on first use.
"""

from megaray.tune.config import Distribution, TuneSearch, TuneSearchConfig, load_tune_config

__all__ = ["Distribution", "TuneSearch", "TuneSearchConfig", "load_tune_config", "run_search", "SearchResult",
           "TrialSummary"]


def __getattr__(name):
    if name in ("run_search", "SearchResult", "TrialSummary"):
        from megaray.tune import search

        return getattr(search, name)
    raise AttributeError(name)
