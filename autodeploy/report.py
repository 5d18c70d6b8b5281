"""``python -m autodeploy.report SWEEP_DIR``: (re)write a sweep's summary from its job folders.

For a sweep folder copied from a cluster, or one whose sweep died before its end. Writes
``summary.csv``, ``summary.md`` and ``summary.png`` into the folder and prints the table; exits 1
when a job failed or left no result (as the sweep itself does), 2 on bad input.
"""

from __future__ import annotations

import argparse
import sys

from autodeploy.sweep.summary import METRICS, collect, markdown_table, write


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m autodeploy.report", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", help="the multirun folder (holds one sub-folder per job)")
    parser.add_argument("--metric", choices=[c for c, _ in METRICS],
                        help="the metric of summary.png (default: the first of decode_tok_s, output_tok_s, ...)")
    args = parser.parse_args(argv)
    try:
        summary = collect(args.sweep_dir, metric=args.metric)
    except FileNotFoundError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 2
    if not summary.rows:
        print(f"Error: no job folders in {args.sweep_dir} (a job folder holds .hydra/overrides.yaml, "
              "results.json or failure.json)", file=sys.stderr)
        return 2
    write(summary)
    print(markdown_table(summary))
    print("wrote " + ", ".join(str(p) for p in summary.files))
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
