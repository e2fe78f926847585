"""`python -m harness` is `mpeval`."""

from harness.cli import main

main()
