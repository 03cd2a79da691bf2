"""latentrt report RESULTS.jsonl...: Markdown tables, target checks and PNG charts of benchmark runs."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("report", help="turn `latentrt bench` JSON lines into Markdown tables and PNG charts")
    p.add_argument("results", nargs="+", help="JSON-lines files written by `latentrt bench -o`")
    p.add_argument("-o", "--output", default="bench-report", help="folder for report.md and the charts")
    p.add_argument("--title", default="latentrt benchmarks", help="title of the report")
    p.add_argument("--command", help="the command that produced the results (shown in the report)")
    p.add_argument("--name", default="report.md", help="file name of the Markdown report (e.g. RESULTS.md)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..bench.report import write_report

    md = write_report(args.results, args.output, title=args.title, command=args.command, name=args.name)
    print(f"wrote {md}")
    return 0
