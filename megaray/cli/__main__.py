"""``python -m megaray.cli ...`` is ``megaray ...``."""

from megaray.cli.app import main

main()
