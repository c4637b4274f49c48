"""`python -m berth.cli`: how berth starts itself (the built-in worker, tests, benches)."""

from berth.cli import main

main()
