"""`python -m pulse.cli`: the `pulse` command, as the tests and the benchmarks start it."""

from pulse.cli import main

main()
