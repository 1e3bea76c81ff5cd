"""``python -m cli ...`` is ``zoo ...`` (what MLproject's entry points and the tests run)."""

from cli.main import main

main()
