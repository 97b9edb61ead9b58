"""``python -m npcalls`` is the ``npcalls`` command."""

from .cli import run

run()
