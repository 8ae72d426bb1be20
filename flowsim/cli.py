"""The ``flowsim`` command line: run | report | compare | list | info.

Errors are one line on stderr (``flowsim: error: …``) with exit code 2; never a bare traceback.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import warnings
from pathlib import Path

import numpy as np



def columns(rows: list[list[str]], right: frozenset = frozenset()) -> str:
    """Rows of cells as text columns as wide as their widest cell (the first row is the header, underlined);
    the columns numbered in ``right`` are right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             .rstrip() for row in rows]
    return "\n".join([lines[0], "-" * max(map(len, lines)), *lines[1:]])


def summary_table(ds) -> str:
    """One line per run: process, rule, lr, final loss, the step it diverged at, wall time."""
    from flowsim.compare import last_recorded
    rows = [["run", "process", "rule", "lr", "final loss", "diverged at step", "wall s"]]
    final_loss, final_wall = (last_recorded(ds[v]) if v in ds else None for v in ("loss", "wall_time"))
    for name in ds.run.values:
        r = ds.sel(run=name)
        final = "nan" if final_loss is None else f"{float(final_loss.sel(run=name)):.4g}"
        wall = np.nan if final_wall is None else float(final_wall.sel(run=name))
        rows.append([str(name), str(r.process.values), str(r.rule.values), f"{float(r.lr):.4g}", final,
                     f"{int(r.diverged_at)}" if bool(r.diverged) else "-", "-" if np.isnan(wall) else f"{wall:.1f}"])
    return columns(rows, right=frozenset({3, 4, 5, 6}))


def cmd_run(args) -> int:
    import flowsim
    out = Path(args.output) if args.output else Path(Path(args.scenario).stem + ".zarr")
    ds = flowsim.run(args.scenario, out, steps=args.steps, device=args.device,
                     overwrite=args.overwrite, resume=args.resume, scheduler=args.scheduler,
                     progress=False if args.quiet else None)
    print(summary_table(ds))
    print(f"stored in {out}  (open with flowsim.open({str(out)!r}))")
    if args.report:
        from flowsim.report import write
        print(f"report written to {write(ds, out.with_suffix('.html'))}")
    return 0


def cmd_report(args) -> int:
    from flowsim.report import write
    print(f"report written to {write(args.store, args.output, x=args.x)}")
    return 0


def cmd_compare(args) -> int:
    import flowsim
    from flowsim.compare import summary_table as compare_table
    print(compare_table(flowsim.compare(flowsim.open(args.store), args.reference, rtol=args.rtol)))
    return 0


def cmd_list(args) -> int:
    import yaml
    from flowsim.scenario import bundled
    rows = [["scenario", "model", "steps", "runs"]]
    for name, path in sorted(bundled().items()):
        doc = yaml.safe_load(path.read_text())
        rows.append([name, str(doc.get("problem", {}).get("model", "?")), str(doc.get("steps")),
                     ", ".join(doc.get("runs", {}))])
    print(columns(rows, right=frozenset({2})))
    return 0


def cmd_info(args) -> int:
    import torch
    import xarray
    import zarr

    import flowsim
    from flowsim.models.problem import resolve_device
    print(f"flowsim   {flowsim.__version__}")
    print(f"python    {platform.python_version()}  ({platform.platform()})")
    for mod in (torch, np, xarray, zarr):
        print(f"{mod.__name__:<9} {mod.__version__}")
    print(f"device    auto -> {resolve_device('auto')}  (cuda available: {torch.cuda.is_available()})")
    print(f"threads   {torch.get_num_threads()}")
    print("dtype     float64 by default (scenario key 'dtype': float32 | float64)")
    return 0


def parser() -> argparse.ArgumentParser:
    from flowsim import __version__
    p = argparse.ArgumentParser(prog="flowsim", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"flowsim {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a scenario and store the results", description=(
        "Run a scenario and store the results, with a progress bar per run on a terminal (elsewhere a line on "
        "stderr at most every 30 s). Duration: the "
        "quickstart takes about 15 s on one CPU core; a discrete step of the bundled models takes milliseconds, a "
        "flow's unit of time 10-250x that and a central flow's 20-500x (README: Processes and what they cost), "
        "so try a flow with a short --steps first."))
    r.add_argument("scenario", help="scenario YAML file, or the name of a bundled scenario (see `flowsim list`)")
    r.add_argument("-o", "--output", help="store path (default: <scenario name>.zarr)")
    r.add_argument("--steps", type=int, help="override the scenario's number of steps")
    r.add_argument("--device", choices=["auto", "cpu", "cuda"], help="override the scenario's device")
    r.add_argument("--overwrite", action="store_true", help="replace an existing store")
    r.add_argument("--resume", action="store_true",
                   help="continue the unfinished runs of an existing store from their checkpoints; skip finished ones")
    r.add_argument("--scheduler", metavar="local|ADDRESS",
                   help="run each (sweep point, run) on dask.distributed: 'local' starts a LocalCluster")
    r.add_argument("-q", "--quiet", action="store_true",
                   help="no progress (a bar per run on a terminal, else a line on stderr at most every 30 s)")
    r.add_argument("--report", action="store_true", help="also write the HTML report next to the store (.html)")
    r.set_defaults(func=cmd_run)
    rep = sub.add_parser("report", help="write a self-contained HTML report of a store")
    rep.add_argument("store", help="the store (.zarr) written by `flowsim run`")
    rep.add_argument("-o", "--output", help="HTML file, or a folder to write it in (default: the store's path with "
                     ".html)")
    rep.add_argument("--x", choices=["step", "time", "scaled_step"],
                     help="the x axis of every figure and summary column: optimizer steps, time (Σ η) or step × κ (a "
                          "sweep of scale); default: step × κ for a sweep of scale, time when the runs share one "
                          "rule and given step sizes within 10×, else step")
    rep.set_defaults(func=cmd_report)
    c = sub.add_parser("compare", help="distances and gaps of every run against a reference run")
    c.add_argument("store", help="the store (.zarr) written by `flowsim run`")
    c.add_argument("--reference", help="reference run (default: the scenario's compare.reference, else the first run)")
    c.add_argument("--rtol", type=float, default=0.1, help="relative tolerance of the *_exceeds_at steps")
    c.set_defaults(func=cmd_compare)
    sub.add_parser("list", help="list the bundled scenarios").set_defaults(func=cmd_list)
    sub.add_parser("info", help="versions, device and dtype").set_defaults(func=cmd_info)
    return p


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings on the command line read like its errors: one line, no source excerpt."""
    return f"flowsim: warning: {message}\n"


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    warnings.formatwarning = _one_line_warning
    try:
        return args.func(args)
    except (ValueError, FileExistsError, FileNotFoundError, KeyError) as e:
        text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)  # KeyError's str() adds quotes
        msg = str(text).splitlines()[0] if str(text) else type(e).__name__
        print(f"flowsim: error: {msg}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (flowsim list | head): not an error
        sys.stdout = open(os.devnull, "w")
        return 0
    except KeyboardInterrupt:
        print("flowsim: interrupted; the rows written so far are kept in the store (continue with --resume)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
