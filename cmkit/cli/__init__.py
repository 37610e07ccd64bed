"""The `cmkit` command line: the only place flags and config files become components.

options   flag types, --config files, one-line parse errors
training  train-teacher, distill, train (flags -> a recipe's options)
sampling  sample, eval, tune-times
tools     edit, quickstart, export-diffusers, import-diffusers
app       the parser and main(): errors -> one line and an exit code
"""

from cmkit.cli.app import build_parser, main

__all__ = ["build_parser", "main"]
