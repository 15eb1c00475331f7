"""compare.py's results as a plain or Markdown table with the targets, and as a chart."""

import harness
from harness import Case

TEXT_COLUMNS = 3  # case, shape, causal; the other columns are numbers, aligned right


def title(env, machine):
    return (f"fastattn {env['fastattn']} ({env['fastattn isa']}), {env['dtype']}, "
            f"{env['threads']} threads, {env['cpu']}")


def peers_in(records):
    present = {name for record in records for name in record["results"]}
    return [name for name in harness.PEERS + harness.HALF_PEERS + harness.EXTRA_PEERS if name in present]


def table_rows(records, machine=None):
    """The header and one row of cells per record; without `machine` (the GPU run) no columns for
    the CPU ceilings."""
    peers = peers_in(records)
    ceilings = machine is not None
    header = ["case", "shape B,Hq,Hk,L,S,D", "causal", "fastattn ms", "GFLOP/s",
              *([f"% {machine['gemm']['name']}"] if ceilings else []), "K+V GB/s", *(["% read"] if ceilings else [])]
    for peer in peers:
        header += [f"{peer} ms", f"vs {peer}"]
    rows = [header]
    for record in records:
        case = Case(**record["case"])
        results = record["results"]
        row = [
            case.label, case.shape, causal_text(case),
            time_cell(results, "fastattn"),
            number_cell(results["fastattn"].get("gflops"), "{:.1f}"),
            *([number_cell(record["percent_of_gemm"], "{:.0f}%")] if ceilings else []),
            number_cell(results["fastattn"].get("kv_gbps"), "{:.1f}"),
            *([number_cell(record["percent_of_read"], "{:.0f}%")] if ceilings else []),
        ]
        for peer in peers:
            row += [time_cell(results, peer), number_cell(record["speedup"].get(peer), "{:.2f}x")]
        rows.append(row)
    return rows


def time_cell(results, name):
    if name not in results:  # not run: the reference where unaffordable
        return "-"
    result = results[name]
    return f"{result['median_ms']:.3f}" if result["ok"] else "FAIL"


def number_cell(value, value_format):
    return "-" if value is None else value_format.format(value)


def text_table(records, machine):
    return aligned_text(table_rows(records, machine))


def aligned_text(rows):
    """Rows of cells as plain-text columns: the text columns aligned left, the numbers right."""
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [cell.ljust(width) if column < TEXT_COLUMNS else cell.rjust(width)
                 for column, (cell, width) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def ceilings_line(machine):
    gemm, read = machine["gemm"], machine["read"]
    return (f"measured in this run: {gemm['name']} {gemm['size']}^3 at "
            f"{gemm['gflops']:.0f} GFLOP/s, "
            f"a streaming read of {read['bytes'] >> 20} MB with {read['threads']} threads at "
            f"{read['gbps']:.1f} GB/s (medians of {len(gemm['samples_ms'])} samples)")


def text_targets(machine, verdicts):
    lines = [ceilings_line(machine), "targets:"]
    lines += [f"  {verdict.status:4}  {verdict.goal}: {verdict.detail}" for verdict in verdicts]
    return "\n".join(lines)


def markdown(title, records, machine, verdicts):
    rows = table_rows(records, machine)
    alignment = ["---"] * TEXT_COLUMNS + ["---:"] * (len(rows[0]) - TEXT_COLUMNS)
    lines = [f"{title}; {ceilings_line(machine)}.", ""]
    lines += [markdown_row(rows[0]), markdown_row(alignment)]
    lines += [markdown_row(row) for row in rows[1:]]
    lines += ["", "Targets:", ""]
    lines += [f"- **{verdict.status}** {verdict.goal}: {verdict.detail}" for verdict in verdicts]
    return "\n".join(lines)


def markdown_row(cells):
    return "| " + " | ".join(cells) + " |"


def write_chart(path, title, records):
    """Horizontal bars of fastattn's speedup over torch per shape (over the reference when torch
    is not installed), with the break-even line at 1.0. False if there was nothing to draw;
    ImportError without matplotlib."""
    import matplotlib  # optional: only the chart needs it

    matplotlib.use("Agg")  # draws to a file, needs no display
    import matplotlib.pyplot as plt

    peer = "torch" if any("torch" in record["speedup"] for record in records) else "reference"
    bars = [(bar_name(record), record["speedup"][peer])
            for record in records if peer in record["speedup"]]
    if not bars:
        return False
    names, speedups = zip(*bars)
    positions = range(len(bars))
    figure, axes = plt.subplots(figsize=(9, 1.3 + 0.4 * len(bars)))
    drawn = axes.barh(positions, speedups,
                      color=["tab:green" if speedup >= 1 else "tab:red" for speedup in speedups])
    axes.bar_label(drawn, labels=[f"{speedup:.2f}x" for speedup in speedups], padding=3,
                   bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})  # over the 1.0 line
    axes.set_yticks(positions, names)
    axes.invert_yaxis()  # first shape on top, as in the table
    axes.axvline(1.0, color="black", linewidth=1, zorder=0)
    if max(speedups) / min(speedups) > 8:  # one bar (a sliding window) would flatten the rest
        axes.set_xscale("log", base=2)
        axes.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}x"))
    axes.margins(x=0.15)  # room for the value labels
    axes.set_xlabel(f"fastattn's speedup over {peer} ({peer}'s time / fastattn's time)")
    axes.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def bar_name(record):
    case = Case(**record["case"])
    kind = {"no": "", "yes": " causal"}.get(causal_text(case), " " + causal_text(case))
    return f"{case.label} {case.shape}{kind}".strip()


def causal_text(case):
    if not case.causal:
        return "no"
    return "yes" if case.window is None else f"window {case.window}"
