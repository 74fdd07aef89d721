"""Draw the peer benchmark as an SVG bar chart, in pure Python (no matplotlib).

    python bench/chart.py                     # docs/bench.csv, newest run -> docs/bench.svg
    python bench/chart.py --run 2026-11-30 --out /tmp/older.svg
    python bench/chart.py --peers-json ../shared/bench/results/peers-latest.json --csv-out new.csv

Input: docs/bench.csv (lines starting with # are comments; columns run, kind, name,
drain_per_s, x_floor; kind is floor, wakaq or peer), or the JSON that the peer benchmark
writes (`--peers-json`: its raw, ours, ours-quiet, wakaq, huey-quiet, taskiq, saq and streaq
variants, median drain). One run is drawn: a bar per row, longest first after the floor.
"""

import argparse
import csv
import io
import json
import sys
from datetime import datetime
from pathlib import Path
from xml.sax.saxutils import escape

ROOT = Path(__file__).resolve().parent.parent
COLOURS = {"floor": "#9aa0a6", "wakaq": "#d9480f", "peer": "#4c6ef5"}
# peer benchmark variant -> (kind, label); the versions come from the JSON
VARIANTS = {
    "raw": ("floor", "raw redis-py floor"),
    "ours": ("wakaq", "wakaq.py {module} (INFO line per task)"),
    "ours-quiet": ("wakaq", "wakaq.py {module} (no per-task line)"),
    "wakaq": ("peer", "original WakaQ {wakaq}"),
    "huey-quiet": ("peer", "Huey {huey} (quiet)"),
    "taskiq": ("peer", "Taskiq {taskiq}"),
    "saq": ("peer", "SAQ {saq}"),
    "streaq": ("peer", "streaq {streaq}"),
}


class _Unknown(dict):
    """Versions for a label; a missing one shows as ?."""

    def __missing__(self, key):
        return "?"


def read_csv(path):
    with open(path, newline="") as f:
        lines = [line for line in f if line.strip() and not line.startswith("#")]
    rows = list(csv.DictReader(io.StringIO("".join(lines))))
    for row in rows:
        row["drain_per_s"] = float(row["drain_per_s"])
        row["x_floor"] = float(row["x_floor"])
    return rows


def read_peers_json(path):
    """Rows of one run of the peer benchmark (its JSON), with x_floor computed from `raw`."""
    with open(path) as f:
        data = json.load(f)
    run = data["meta"]["started"][:10]
    drains = {}
    for variant in data["variants"]:
        name = variant["variant"]
        if name in VARIANTS and "drain_rate" in variant.get("summary", {}):
            kind, label = VARIANTS[name]
            label = label.format_map(_Unknown(variant.get("versions", {})))
            drains[name] = (kind, label, variant["summary"]["drain_rate"]["median"])
    if "raw" not in drains:
        sys.exit(f"bench/chart.py: {path} has no raw floor (variant 'raw')")
    floor = drains["raw"][2]
    return [
        {"run": run, "kind": k, "name": label, "drain_per_s": round(d), "x_floor": d / floor}
        for k, label, d in drains.values()
    ]


def write_csv(rows, path):
    with open(path, "w", newline="") as f:
        out = csv.DictWriter(f, ["run", "kind", "name", "drain_per_s", "x_floor"])
        out.writeheader()
        for row in rows:
            out.writerow(
                {
                    **row,
                    "drain_per_s": round(row["drain_per_s"]),
                    "x_floor": f"{row['x_floor']:.2f}",
                }
            )


def svg(rows, title, subtitle):
    """A horizontal bar chart: one bar per row, its drain in tasks/s and its ratio to the floor."""
    width, left, right, top, bar, gap = 760, 270, 150, 78, 24, 10
    plot = width - left - right
    height = top + len(rows) * (bar + gap) + 46
    peak = max(row["drain_per_s"] for row in rows)
    step = nice_step(peak)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="Helvetica, Arial, sans-serif" '
        f'font-size="13" role="img" aria-label="{escape(title)}">',
        f"<title>{escape(title)}</title>",
        f'<rect width="{width}" height="{height}" fill="#ffffff"/>',
        f'<text x="16" y="26" font-size="17" font-weight="bold" fill="#212529">'
        f"{escape(title)}</text>",
        f'<text x="16" y="47" fill="#495057">{escape(subtitle)}</text>',
    ]
    bottom = top + len(rows) * (bar + gap) - gap / 2
    tick = 0
    while tick <= peak:
        x = left + plot * tick / peak
        out.append(
            f'<line x1="{x:.1f}" y1="{top - 8}" x2="{x:.1f}" y2="{bottom:.1f}" stroke="#dee2e6"/>'
        )
        out.append(
            f'<text x="{x:.1f}" y="{bottom + 16:.1f}" text-anchor="middle" '
            f'fill="#868e96" font-size="11">{tick:,.0f}</text>'
        )
        tick += step
    for i, row in enumerate(rows):
        y = top + i * (bar + gap)
        w = max(1.0, plot * row["drain_per_s"] / peak)
        colour = COLOURS.get(row["kind"], COLOURS["peer"])
        weight = ' font-weight="bold"' if row["kind"] == "wakaq" else ""
        out += [
            f'<text x="{left - 10}" y="{y + bar * 0.7:.1f}" text-anchor="end" '
            f'fill="#212529"{weight}>{escape(row["name"])}</text>',
            f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar}" rx="3" fill="{colour}"/>',
            f'<text x="{left + w + 8:.1f}" y="{y + bar * 0.7:.1f}" fill="#212529">'
            f"{row['drain_per_s']:,.0f}/s · {row['x_floor']:.2f}× floor</text>",
        ]
    out.append(
        f'<text x="{left + plot / 2:.1f}" y="{height - 10}" text-anchor="middle" '
        'fill="#495057" font-size="12">drain, tasks/s (longer is faster)</text>'
    )
    out.append("</svg>")
    return "\n".join(out) + "\n"


def nice_step(peak):
    """A round grid step giving about five lines up to `peak`."""
    raw = peak / 5
    magnitude = 10 ** (len(str(int(raw))) - 1)
    for factor in (1, 2, 2.5, 5, 10):
        if raw <= factor * magnitude:
            return factor * magnitude
    return 10 * magnitude


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--csv", default=str(ROOT / "docs" / "bench.csv"))
    parser.add_argument("--peers-json", help="read a peer benchmark JSON instead of the CSV")
    parser.add_argument("--run", help="which run of the CSV (default: the newest)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "bench.svg"))
    parser.add_argument("--csv-out", help="also write the rows drawn as CSV (with --peers-json)")
    args = parser.parse_args(argv)
    rows = read_peers_json(args.peers_json) if args.peers_json else read_csv(args.csv)
    run = args.run or max(row["run"] for row in rows)
    rows = [row for row in rows if row["run"] == run]
    if not rows:
        parser.error(f"no rows for run {run!r}")
    rows.sort(key=lambda row: (row["kind"] != "floor", -row["drain_per_s"]))
    date = datetime.strptime(run, "%Y-%m-%d")
    day = f"{date.day} {date:%B %Y}"
    title = "Drain of 20,000 queued no-op tasks, 2 worker processes each"
    subtitle = f"median of 3 runs, {day}, one 2-vCPU VM, one redis-server; floor = plain redis-py"
    Path(args.out).write_text(svg(rows, title, subtitle), encoding="utf-8")
    if args.csv_out:
        write_csv(rows, args.csv_out)
    print(f"bench/chart.py: wrote {args.out} ({len(rows)} bars, run {run})")


if __name__ == "__main__":
    main()
