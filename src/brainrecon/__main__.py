"""``python -m brainrecon``: the command line (as the ``brainrecon`` command)."""
from .cli import app

app(prog_name="brainrecon")
