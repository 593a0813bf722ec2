"""The blocks a report is made of: the markdown and the HTML report are both
rendered from one list of them, so they say the same."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from qbench.present.charts import Chart


@dataclass
class Block:
    kind: str  # "h2" | "p" | "list" | "table" | "img"
    text: str = ""
    items: tuple = ()
    headers: tuple = ()
    rows: tuple = ()
    png: bytes = b""
    #: the interactive version of an "img" block, for report.html
    chart: Optional[Chart] = None
    #: a "table" whose rows a reader can sort by clicking a header (report.html)
    sortable: bool = False
