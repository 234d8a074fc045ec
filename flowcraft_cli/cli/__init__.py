"""The command line: a thin Typer shell over the library (``app.py``); rich output lives in ``render.py``."""
