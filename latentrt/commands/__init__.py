"""Subcommands of the ``latentrt`` CLI, one module each (see :mod:`latentrt.cli`)."""
