"""`python -m omniq.cli`: the same as the `omniq` command."""

from omniq.cli.app import main

main()
