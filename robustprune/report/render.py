"""Print stored results: rich tables in the terminal, markdown, or long-format CSV."""

from __future__ import annotations

import re
from pathlib import Path

from rich import box
from rich.cells import cell_len
from rich.console import Console
from rich.markup import escape
from rich.table import Table as RichTable

from robustprune.errors import UserError
from robustprune.files import STORE_UNCHANGED, write_failed
from robustprune.report.tables import Table, all_tables, long_csv, to_markdown
from robustprune.study.schema import StudyConfig
from robustprune.study.store import Store

# Numbers, "—", "✓" and "⚠ n" right-align; any other text (labels, settings) left-aligns.
NUMERIC = re.compile(r"^([-−+]?[\d.,]+|—|✓|⚠ \d+)( |$)")


def is_numeric(column: list[str]) -> bool:
    return all(NUMERIC.match(v) for v in column if v)


def natural_width(t: Table) -> int:
    """Terminal columns the table takes in the default style, nothing wrapped."""
    widths = [max(map(cell_len, col)) for col in zip(t.headers, *t.rows)]
    return sum(widths) + 3 * len(widths) + 1


def to_rich(t: Table, width: int | None = None) -> RichTable:
    """A rich table; one wider than `width` (the corruption types: 17 columns) drops the vertical
    rules and puts '± std' under the mean, so that rich need not wrap every cell at random."""
    compact = width is not None and natural_width(t) > width
    caption = escape("\n".join(x for x in [t.caption, *t.notes] if x))  # '[low, high]' is text, not markup
    rt = RichTable(
        title=escape(t.title),
        title_justify="left",
        caption=caption,
        caption_justify="left",
        box=box.SIMPLE_HEAD if compact else box.HEAVY_HEAD,
        show_edge=not compact,
        padding=(0, 0, 0, 1) if compact else (0, 1),
    )
    for i, h in enumerate(t.headers):
        column = [r[i] for r in t.rows]
        if i and is_numeric(column):
            rt.add_column(escape(h), justify="right")
        else:  # labels keep their width; the numbers give way
            rt.add_column(escape(h), justify="left", min_width=max(map(cell_len, [h, *column])) if i == 0 else None)
    for r in t.rows:
        rt.add_row(*[escape(v.replace(" ± ", "\n± ") if compact else v) for v in r])
    return rt


def print_tables(console: Console, study: StudyConfig, cells: list[dict]) -> None:
    for t in all_tables(study, cells):
        console.print(to_rich(t, console.width))
        console.print()


def load_results(folder: str | Path) -> tuple[StudyConfig, list[dict]]:
    """The study config and cells of the last run recorded in a study folder's store."""
    folder = Path(folder)
    path = folder / "results.sqlite" if folder.is_dir() or not folder.suffix else folder
    store = Store(path, readonly=True)
    try:
        run = store.last_run()
        if run is None:
            raise UserError(f"{path} records no run; run a study into {folder} first")
        return StudyConfig(**run["study_config"]), store.cells(run["cell_hashes"])
    finally:
        store.close()


def write_figures(study: StudyConfig, cells: list[dict], folder: Path, console: Console) -> None:
    from robustprune.report.figures import all_figures

    try:
        paths = all_figures(study, cells, folder)  # each PNG is written whole or not at all
    except OSError as e:
        raise write_failed(folder, e, "--figures", STORE_UNCHANGED) from None
    for path in paths:
        console.print(f"figure: {path}", highlight=False)


def side_by_side(loaded: list[tuple[str, StudyConfig, list[dict]]]) -> Table | None:
    """Several studies' robustness summaries in one table: a row per (study, regime, setting), a
    column per measure any of them has ('—' where a study lacks it)."""
    from robustprune.report.robustness import summary_table

    parts = [
        (folder, t) for folder, study, cells in loaded for r in study.regimes if (t := summary_table(study, cells, r))
    ]
    if len(parts) < 2:
        return None
    headers = list(dict.fromkeys(h for _, t in parts for h in t.headers[1:]))
    rows = []
    for folder, t in parts:
        regime = t.title.split("regime ")[-1].strip("()'")
        for r in t.rows:
            values = dict(zip(t.headers[1:], r[1:]))
            rows.append([Path(folder).name, regime, r[0], *[values.get(h, "—") for h in headers]])
    return Table(
        "Studies side by side: robustness summaries",
        ["Study", "Regime", "Setting", *headers],
        rows,
        "Each study's robustness summary (accuracy %, mean ± std over that study's seeds); the studies' own "
        "sections below give the ε, image counts and seeds of each column.",
    )


def report(folders: list[str], fmt: str, console: Console, figures: str | None = None) -> None:
    if len(folders) > 1 and fmt != "csv":
        table = side_by_side([(f, *load_results(f)) for f in folders])
        if table is not None:
            if fmt == "markdown":
                console.file.write(to_markdown(table) + "\n")
            else:
                console.print(to_rich(table, console.width))
                console.print()
    for folder in folders:
        study, cells = load_results(folder)
        if figures:
            target = Path(figures) / Path(folder).name if len(folders) > 1 else Path(figures)
            # figure paths go to stderr when stdout carries CSV or markdown
            write_figures(study, cells, target, console if fmt == "table" else Console(stderr=True))
        if fmt == "csv":
            console.file.write(long_csv(cells))
            continue
        if len(folders) > 1 and fmt != "csv":
            console.print(f"## {study.name} ({folder})\n")
        if fmt == "markdown":
            for t in all_tables(study, cells):
                console.file.write(to_markdown(t) + "\n")
        else:
            print_tables(console, study, cells)


def report_claims(folders: list[str], fmt: str, console: Console) -> None:
    """Each folder's claims table (report --claims): terminal, markdown or CSV."""
    from robustprune.report.claims import claims_csv, claims_table

    for i, folder in enumerate(folders):
        study, cells = load_results(folder)
        if not study.claims:
            raise UserError(
                f"the study recorded in {folder} lists no claims; add a 'claims:' section to its study file "
                "and run it again (stored cells are reused, nothing is recomputed)"
            )
        if fmt == "csv":
            text = claims_csv(study, cells)
            console.file.write(text if i == 0 else text.split("\n", 1)[1])
        elif fmt == "markdown":
            console.file.write(to_markdown(claims_table(study, cells)) + "\n")
        else:
            console.print(to_rich(claims_table(study, cells), console.width))
            console.print()
