"""Print stored results: rich tables in the terminal, markdown, or long-format CSV."""
from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table as RichTable

from robustprune.errors import UserError
from robustprune.report.tables import Table, all_tables, long_csv, to_markdown
from robustprune.study.schema import StudyConfig
from robustprune.study.store import Store


def to_rich(t: Table) -> RichTable:
    rt = RichTable(title=t.title, title_justify="left", caption=t.caption, caption_justify="left")
    for i, h in enumerate(t.headers):
        rt.add_column(h, justify="left" if i < 2 else "right")
    for r in t.rows:
        rt.add_row(*r)
    return rt


def print_tables(console: Console, study: StudyConfig, cells: list[dict]) -> None:
    for t in all_tables(study, cells):
        console.print(to_rich(t))
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


def report(folders: list[str], fmt: str, console: Console) -> None:
    for folder in folders:
        study, cells = load_results(folder)
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
