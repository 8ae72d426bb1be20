"""The launcher: ``python -m benchmarks NAME [options]`` runs one benchmark of ``benchmarks.BENCHMARKS``;
``python -m benchmarks --help`` lists them with their duration on 2 CPU cores."""
from __future__ import annotations

import argparse
import inspect
import sys
from typing import Optional

from benchmarks import BENCHMARKS


def _listing() -> str:
    rows = [(name, b.duration, b.about) for name, b in BENCHMARKS.items()]
    width = max(len(name) for name, _, _ in rows)
    return ("benchmarks, with their wall time on 2 CPU cores with OMP_NUM_THREADS=1 (full | --quick, a short run\n"
            "that checks it works); NAME --help gives a benchmark's options:\n"
            + "\n".join(f"  {name:<{width}}  {duration:>16}  {about}" for name, duration, about in rows))


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m benchmarks", epilog=_listing(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     description="Run one of flowsim's benchmarks (from the repository root).")
    parser.add_argument("name", metavar="NAME", help="the benchmark to run (listed below)")
    parser.add_argument("options", nargs=argparse.REMAINDER, help="the benchmark's own options")
    if argv and argv[0] in BENCHMARKS:  # everything after the name is the benchmark's, --help included
        name, options = argv[0], argv[1:]
    else:
        args = parser.parse_args(argv)
        name, options = args.name, args.options
    benchmark = BENCHMARKS.get(name)
    if benchmark is None:
        parser.error(f"unknown benchmark {name!r}\n\n{_listing()}")
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # progress shows as it comes, also through a pipe
    fn = benchmark.load()
    try:
        if inspect.signature(fn).parameters:
            return fn(options)
        if {"-h", "--help"} & set(options):  # a main() without options: its module docstring is its help
            print(inspect.getmodule(fn).__doc__ or f"{name}: no options")
            return 0
        sys.argv = [f"python -m benchmarks {name}", *options]  # a main() that reads sys.argv itself
        return fn() or 0
    except FileExistsError as e:  # e.g. a store that exists, refused before anything runs
        print(f"benchmarks: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
