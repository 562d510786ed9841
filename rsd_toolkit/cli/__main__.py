"""``python -m rsd_toolkit.cli`` (what ``torchrun -m`` launches)."""

from . import main

main()
