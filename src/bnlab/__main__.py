"""``python -m bnlab`` runs the command line."""

from bnlab.cli import app

app()
