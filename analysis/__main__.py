"""python -m analysis report --experiment NAME [--sweep RUN_ID] [--tracking-uri URI] [--out DIR]
python -m analysis compare RUN_A RUN_B [--tracking-uri URI] [--checkpoint best|last]"""

from __future__ import annotations

import argparse
import sys

from analysis.store import AnalysisError

DEFAULT_URI = "sqlite:///mlflow.db"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="Markdown report + figures of a sweep (also logged "
                         "under report/ of the sweep run)")
    rep.add_argument("--experiment", required=True, help="MLflow experiment (the sweep's name)")
    rep.add_argument("--sweep", help="sweep (parent) run id; default: the latest sweep run")
    rep.add_argument("--tracking-uri", default=DEFAULT_URI, help=f"default {DEFAULT_URI}")
    rep.add_argument("--out", help="output directory (default reports/<experiment>)")
    rep.add_argument("--loss-window", type=int, default=150,
                     help="moving-average window of the training loss, in steps (default 150)")
    rep.add_argument("--eval-window", type=int, default=10,
                     help="moving-average window of eval curves, in checkpoints (default 10)")
    rep.add_argument("--no-log", action="store_true", help="do not log the report to MLflow")
    cmp_ = sub.add_parser("compare", help="two runs side by side with paired intervals")
    cmp_.add_argument("run_a")
    cmp_.add_argument("run_b")
    cmp_.add_argument("--tracking-uri", default=DEFAULT_URI, help=f"default {DEFAULT_URI}")
    cmp_.add_argument("--checkpoint", choices=("best", "last"), default="best")
    args = parser.parse_args(argv)
    try:
        if args.command == "report":
            for name in ("loss_window", "eval_window"):
                if getattr(args, name) < 1:
                    raise AnalysisError(f"--{name.replace('_', '-')} must be at least 1 "
                                        f"(got {getattr(args, name)})")
            from analysis.report import write_report

            path = write_report(args.tracking_uri, args.experiment, args.sweep, args.out,
                                args.loss_window, args.eval_window, not args.no_log)
            print(f"report: {path}")
        else:
            from analysis.compare import compare_runs, format_comparison

            print(format_comparison(compare_runs(args.tracking_uri, args.run_a, args.run_b,
                                                 args.checkpoint)), end="")
    except AnalysisError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
