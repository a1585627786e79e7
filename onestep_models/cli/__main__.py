"""`python -m onestep_models.cli ...` (and `torchrun -m onestep_models.cli ...`)."""

from onestep_models.cli import entry_point

entry_point()
