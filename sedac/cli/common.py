"""Shared CLI behaviour: a clear one-line error and a nonzero exit instead of a traceback."""
from __future__ import annotations

import functools
import os

import click

os.environ.setdefault("HF_HUB_OFFLINE", "1")          # nothing downloads at run time
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def clean_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError, OSError) as e:
            raise click.ClickException(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    return wrapper
