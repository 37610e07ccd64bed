"""The `cmkit` program: the commands' parsers, and errors mapped to one line and an exit code.

User errors print one line on stderr and exit with 2 (an option named by the library is
shown as its flag); a diverged run exits with 3; Ctrl-C or SIGTERM during training saves a
checkpoint and exits with 130 or 143. `--nproc N` starts N processes of this command and
exits with theirs; of several processes only rank 0 prints these lines and saves
options.json (the others meet the same outcome, and any traceback of theirs still shows).
"""

import argparse
import sys
from pathlib import Path

from cmkit import distributed
from cmkit.cli import autoencoder, sampling, tools, training
from cmkit.cli.options import Parser, check_numbers, config_defaults, flag
from cmkit.errors import OptionError, UserError
from cmkit.runs import save_json
from cmkit.train import TrainingDiverged, TrainingInterrupted

COMMANDS = {**training.COMMANDS, **autoencoder.COMMANDS, **sampling.COMMANDS, **tools.COMMANDS}


def build_parser() -> Parser:
    parser = Parser(
        prog="cmkit",
        description="Consistency models: one-step generators from "
        "data or from a diffusion teacher.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for add_parser, _ in COMMANDS.values():
        add_parser(sub)
    return parser


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    sub = parser._subparsers._group_actions[0].choices[args.command]
    if args.config:
        sub.set_defaults(**config_defaults(sub, args.config))
        args = parser.parse_args(argv)
    check_numbers(sub, args)
    return args


def _save_options(args: argparse.Namespace, out: Path) -> None:
    """options.json: the command's options, rerunnable with `--config` (change --out)."""
    skip = ("command", "config", "resume")
    options = {k: v for k, v in vars(args).items() if k not in skip and v is not None}
    save_json(out / "options.json", options)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse(argv)
        if distributed.launches(getattr(args, "nproc", None)):
            return distributed.launch(args.nproc, argv)
        result = COMMANDS[args.command][1](args)
        if isinstance(result, Path) and distributed.is_main_process():
            _save_options(args, result)
            print(f"run saved in {result}")
        return 0
    except OptionError as err:
        _report(f"cmkit: error: {flag(err.option)} {_one_line(err.problem)}")
        return 2
    except UserError as err:
        _report(f"cmkit: error: {_one_line(err)}")
        return 2
    except TrainingDiverged as err:
        _report(f"cmkit: training stopped: {_one_line(err)}")
        return 3
    except TrainingInterrupted as err:
        again = "rerun it" if args.command == "quickstart" else "continue with --resume"
        _report(f"cmkit: {err}; {again}")
        return 128 + err.signal  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
    except (MemoryError, RuntimeError) as err:
        if not _out_of_memory(err):
            raise
        _report(f"cmkit: error: out of memory ({_one_line(err)[:200]})")
        return 2
    except KeyboardInterrupt:
        _report("cmkit: interrupted")
        return 130


def _report(line: str) -> None:
    if distributed.is_main_process():
        print(line, file=sys.stderr)


def _out_of_memory(err: Exception) -> bool:
    """An allocation too large for the machine, e.g. from --n or --batch-size (torch reports
    CPU and CUDA allocation failures as RuntimeErrors that say 'allocate')."""
    return isinstance(err, MemoryError) or "allocate" in str(err)


def _one_line(err: Exception | str) -> str:
    """The message on one line, whatever user text (a file name, a value) it quotes."""
    return " ".join(str(err).split("\n"))
