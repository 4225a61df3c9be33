"""The ``megaray`` command: one Typer app (:mod:`megaray.cli.app`, which also reports every
:class:`~megaray.errors.MegarayError` as ``error: ...``, exit 2), commands grouped by area.

    megaray demo                               prepare the stdlib corpus, train, eval, generate
    megaray prepare text --source stdlib --out data/stdlib-512 --vocab-size 512
    megaray train configs/demo.yaml --set train.max_steps=50
    megaray eval --checkpoint runs/demo
    megaray generate --checkpoint runs/demo --prompt "Return the"
    megaray config configs/demo.yaml --set model.n_layer=2   (print the resolved config)

Modules: ``app`` (the app, error reporting), ``options`` (up-front option checks), ``run``
(config, train, tune, demo), ``prepare`` (prepare text/audio/audio-latents/images/image-latents),
``infer`` (eval, generate, vocode, sample, export).
"""

# each module registers its commands; --help lists them in this order
from megaray.cli import run, prepare, infer  # noqa: F401,I001
from megaray.cli.app import app, main

__all__ = ["app", "main"]
