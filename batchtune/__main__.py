"""``python -m batchtune`` (and ``torchrun -m batchtune``)."""

from batchtune.cli import main

main()
