"""A self-contained report of one or more study folders: report.md with every table and figure,
each table also as CSV and LaTeX (tables/), the figures as PNG (figures/), and the long-format
CSV of every stored number (results.csv)."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

from robustprune.files import STORE_UNCHANGED, write_failed, write_text
from robustprune.report.tables import Table, all_tables, long_csv, to_markdown
from robustprune.study.schema import StudyConfig

LATEX_SPECIALS = {
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "\\": r"\textbackslash{}",
}
LATEX_SYMBOLS = {
    "±": r"$\pm$",
    "ε": r"$\varepsilon$",
    "↓": r"$\downarrow$",
    "−": "-",
    "—": "--",
    "⚠": r"$^\dagger$",
    "∏": r"$\prod$",
    "≤": r"$\leq$",
    "✓": r"\checkmark{}",
    "′": "'",
    "Δ": r"$\Delta$",
}


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:60] or "table"


def latex_escape(text: str) -> str:
    out = "".join(LATEX_SPECIALS.get(ch, ch) for ch in text)
    for symbol, tex in LATEX_SYMBOLS.items():
        out = out.replace(symbol, tex)
    return out


def to_latex(t: Table) -> str:
    """A booktabs table: label column left, numbers right, caption under it."""
    spec = "l" + "r" * (len(t.headers) - 1)
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        r"\small",
        rf"\begin{{tabular}}{{{spec}}}",
        r"\toprule",
        " & ".join(latex_escape(h) for h in t.headers) + r" \\",
        r"\midrule",
    ]
    lines += [" & ".join(latex_escape(v) for v in r) + r" \\" for r in t.rows]
    lines += [
        r"\bottomrule",
        r"\end{tabular}",
        rf"\caption{{{latex_escape(t.title)}. {latex_escape(' '.join([t.caption, *t.notes]))}}}",
        r"\end{table}",
    ]
    return "\n".join(lines) + "\n"


def to_csv(t: Table) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(t.headers)
    w.writerows(t.rows)
    return buf.getvalue()


def write_study(study: StudyConfig, cells: list[dict], folder: Path, source: str, heading: str = "#") -> list[str]:
    """Write one study's tables and figures under `folder`; returns its markdown lines (links
    relative to the report's folder)."""
    from robustprune.report.figures import all_figures

    tables_dir, figures_dir = folder / "tables", folder / "figures"
    done = [c for c in cells if c["status"] == "done"]
    lines = [
        f"{heading} {study.name}",
        "",
        study.description,
        "",
        f"Results of `{source}`: {len(done)} cells done, {len(cells) - len(done)} failed; "
        f"seeds {sorted({c['axes']['seed'] for c in done})}. Every table is also in `tables/` as CSV and "
        f"LaTeX; `results.csv` holds every stored number with its cell's config hash.",
        "",
    ]
    for i, t in enumerate(all_tables(study, cells), start=1):
        name = f"{i:02d}_{slug(t.title)}"
        _write(tables_dir / f"{name}.csv", to_csv(t))
        _write(tables_dir / f"{name}.tex", to_latex(t))
        lines += [
            to_markdown(t).replace("### ", heading + "## ", 1),
            f"[CSV](tables/{name}.csv) · [LaTeX](tables/{name}.tex)",
            "",
        ]
    figures = all_figures(study, cells, figures_dir)
    if figures:
        lines += [f"{heading}## Figures", ""]
        lines += [f"![{p.stem}](figures/{p.name})\n" for p in figures]
    _write(folder / "results.csv", long_csv(cells))
    return lines


def _write(path: Path, text: str) -> Path:
    return write_text(path, text, "--out", STORE_UNCHANGED)


def write_report(folders: list[str], out: str | Path) -> Path:
    """report.md in `out` for one study folder; for several, one section (and subfolder) each."""
    from robustprune.report.render import load_results

    out = Path(out)
    loaded = [(f, *load_results(f)) for f in folders]  # every store is checked before anything is written
    try:
        out.mkdir(parents=True, exist_ok=True)
        if len(loaded) == 1:
            folder, study, cells = loaded[0]
            lines = write_study(study, cells, out, folder)
        else:
            from robustprune.report.render import side_by_side

            lines = ["# Studies side by side", ""]
            table = side_by_side(loaded)
            if table is not None:
                _write(out / "side_by_side.csv", to_csv(table))
                lines += [to_markdown(table), "[CSV](side_by_side.csv)", ""]
            for folder, study, cells in loaded:
                sub = slug(Path(folder).name)
                part = write_study(study, cells, out / sub, folder, heading="##")
                lines += [re.sub(r"\]\((tables|figures)/", f"]({sub}/\\1/", line) for line in part]
        path = _write(out / "report.md", "\n".join(lines) + "\n")  # last: a report.md links only finished files
    except OSError as e:  # (the folder itself; every file is written by write_text)
        raise write_failed(out, e, "--out", STORE_UNCHANGED) from None
    return path
