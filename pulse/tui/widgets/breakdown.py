"""Breakdown tables in tabs: pages, entry pages, referrers, UTM, browsers, OS, devices, users.

Only the visible tab is queried. Rows are updated by key, keeping the cursor where it was.
"""

from __future__ import annotations

from datetime import datetime

from textual.app import ComposeResult
from textual.widget import Widget
from textual.widgets import DataTable, TabbedContent, TabPane

from pulse.protocol import Ranked, UserRow
from pulse.tui.state import number, plain

# tab id -> (title, endpoint, extra parameters)
TABS = {
    "pages": ("Pages", "pages", {}),
    "entry-pages": ("Entry", "entry-pages", {}),
    "exit-pages": ("Exit", "exit-pages", {}),
    "referrers": ("Referrers", "referrers", {}),
    "utm": ("UTM", "utm", {"dimension": "source"}),
    "browsers": ("Browsers", "browsers", {}),
    "os": ("OS", "os", {}),
    "devices": ("Devices", "devices", {}),
    "users": ("Users", "users", {"limit": "50"}),
}


class BreakdownTabs(Widget):
    def compose(self) -> ComposeResult:
        with TabbedContent(id="breakdown-tabs"):
            yield from self._panes()

    def _panes(self) -> ComposeResult:
        for tab, (title, _, _) in TABS.items():
            with TabPane(title, id=f"tab-{tab}"):
                table: DataTable = DataTable(id=f"table-{tab}", cursor_type="row", zebra_stripes=True)
                if tab == "users":
                    table.add_column("User", key="value")
                    table.add_column("Events", key="count")
                    table.add_column("Traits", key="traits")
                    table.add_column("Last seen", key="last_seen")
                else:
                    table.add_column(title if tab != "utm" else "UTM source", key="value")
                    table.add_column("Events" if tab not in ("entry-pages", "exit-pages") else "Sessions", key="count")
                    table.add_column("Users", key="unique_users")
                yield table

    @property
    def current_tab(self) -> str:
        return (self.query_one(TabbedContent).active or "tab-pages").removeprefix("tab-")

    def activate(self, tab: str) -> None:
        self.query_one(TabbedContent).active = f"tab-{tab}"

    def show(self, tab: str, rows: list[Ranked] | list[UserRow]) -> None:
        """UserRows on the users tab, Ranked rows on the others."""
        table = self.query_one(f"#table-{tab}", DataTable)
        cells = {}
        for row in rows:
            if isinstance(row, UserRow):
                cells[row.distinct_id] = (plain(row.distinct_id), number(row.window_events), _traits(row.traits),
                                          _when(row.last_seen))
            else:
                cells[str(row.value)] = (plain(row.value if row.value is not None else "(none)"), number(row.count),
                                         number(row.unique_users))
        update_rows(table, cells)


def update_rows(table: DataTable, cells: dict[str, tuple]) -> None:
    """Make the table show `cells` (row key -> values) in order, changing only what changed; keep the cursor."""
    keys = [row.key.value for row in table.ordered_rows]
    with table.app.batch_update():
        if keys == list(cells):
            columns = [column.key for column in table.ordered_columns]
            for key, values in cells.items():
                for column, value in zip(columns, values):
                    if table.get_cell(key, column) != value:
                        table.update_cell(key, column, value)
            return
        cursor_key = keys[table.cursor_row] if 0 <= table.cursor_row < len(keys) else None
        table.clear()
        for key, values in cells.items():
            table.add_row(*values, key=key)
        if cursor_key in cells:
            table.move_cursor(row=list(cells).index(cursor_key), animate=False)


def _traits(traits: object):
    if not isinstance(traits, dict):
        return ""
    return plain(", ".join(f"{k}={v}" for k, v in traits.items()))


def _when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000).strftime("%b %d %H:%M")
