"""The report's table formats: CSV, Markdown and LaTeX (tabular), one file per table and format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from packinfer_bench.errors import PackinferBenchError

FORMATS = ("md", "csv", "tex")


def check_formats(formats: tuple[str, ...], allowed: tuple[str, ...], option: str) -> None:
    """A PackinferBenchError naming the option and the formats it does not know."""
    bad = [f for f in formats if f not in allowed]
    if bad:
        raise PackinferBenchError(f"{option}: unknown format(s) {bad}; allowed: {list(allowed)}")


def write_tables(tables: dict[str, pd.DataFrame], out: Path, formats: tuple[str, ...]) -> None:
    """Each table as <name>.csv / .md / .tex per `formats`."""
    for name, table in tables.items():
        if "csv" in formats:
            table.to_csv(out / f"{name}.csv", index=False)
        if "md" in formats:
            (out / f"{name}.md").write_text(markdown_table(table) + "\n", encoding="utf-8")
        if "tex" in formats:
            (out / f"{name}.tex").write_text(latex_table(table) + "\n", encoding="utf-8")


def markdown_table(table: pd.DataFrame) -> str:
    """A Markdown table; floats to 3 significant digits, empty for NaN."""
    cols = list(table.columns)
    rows = [["" if isinstance(v, float) and np.isnan(v) else f"{v:.3g}" if isinstance(v, float) else str(v)
             for v in row] for row in table.itertuples(index=False)]
    return "\n".join(["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
                     + ["| " + " | ".join(r) + " |" for r in rows])


def latex_table(table: pd.DataFrame) -> str:
    """A LaTeX tabular; floats to 3 significant digits, empty for NaN, _ % & escaped."""
    def cell(v) -> str:
        text = f"{v:.3g}" if isinstance(v, float) else str(v)
        return "" if text == "nan" else text.replace("_", r"\_").replace("%", r"\%").replace("&", r"\&")

    lines = [r"\begin{tabular}{" + "l" * len(table.columns) + "}", r"\hline",
             " & ".join(cell(c) for c in table.columns) + r" \\", r"\hline"]
    lines += [" & ".join(cell(v) for v in row) + r" \\" for row in table.itertuples(index=False)]
    return "\n".join(lines + [r"\hline", r"\end{tabular}"])
