"""The help screen: every key, generated from the bindings so it cannot fall out of date."""

from __future__ import annotations

from collections.abc import Sequence

from rich.table import Table
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

# Keys handled by name rather than through a visible binding, described for the help screen.
EXTRA_KEYS: tuple[tuple[str, str], ...] = (
    ("↑ ↓ PgUp PgDn Home End", "move in the table"),
    ("Enter", "drill into the selected process"),
    ("Esc", "back / clear the filter"),
)


def key_display(key: str) -> str:
    names = {
        "question_mark": "?",
        "slash": "/",
        "plus": "+",
        "minus": "-",
        "escape": "Esc",
        "enter": "Enter",
        "less_than_sign": "<",
        "greater_than_sign": ">",
        "left_square_bracket": "[",
        "right_square_bracket": "]",
        "comma": ",",
        "full_stop": ".",
        "ctrl+c": "Ctrl+C",
        "tab": "Tab",
        "shift+tab": "Shift+Tab",
    }
    return ", ".join(names.get(k.strip(), k.strip()) for k in key.split(","))


def help_table(sections: list[tuple[str, list[tuple[str, str]]]]) -> Table:
    table = Table(box=None, show_header=False, padding=(0, 2), expand=True)
    table.add_column(style="bold cyan", no_wrap=True, width=22)
    table.add_column(ratio=1)
    for title, rows in sections:
        table.add_row(f"[bold underline]{title}[/]", "")
        for key, description in rows:
            table.add_row(key, description)
        table.add_row("", "")
    return table


class HelpScreen(ModalScreen[None]):
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > VerticalScroll {
        width: 76; height: 80%; border: thick $primary; background: $surface; padding: 1 2;
    }
    """
    BINDINGS = [Binding("escape,q,question_mark", "app.pop_screen", "Close")]

    def __init__(self, sections: list[tuple[str, list[tuple[str, str]]]]) -> None:
        super().__init__()
        self.sections = sections

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield Static(help_table(self.sections), id="help-text")


def describe_bindings(bindings: Sequence[Binding | tuple[str, ...]]) -> list[tuple[str, str]]:
    rows = []
    for b in bindings:
        binding = b if isinstance(b, Binding) else Binding(b[0], b[1], b[2] if len(b) > 2 else "")
        rows.append((key_display(binding.key), binding.description or binding.action))
    return rows
