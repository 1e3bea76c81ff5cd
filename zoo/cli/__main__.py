"""``python -m zoo.cli ...`` is ``zoo ...`` (what MLproject's entry points and the tests run)."""

from zoo.cli.main import main

main()
