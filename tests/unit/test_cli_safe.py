"""``banyan_bus.cli.output.safe``: nothing a publisher wrote may act on the operator's terminal."""

from __future__ import annotations

import pytest

from banyan_bus.cli.output import markup, safe


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("evt_1\x1b]0;pwned\x07", "evt_1"),  # OSC: window title
        ("evt_1\x1b[2J\x1b[H", "evt_1"),  # CSI: clear the screen
        ("\x1b]8;;https://evil.example/\x1b\\click\x1b]8;;\x1b\\", "click"),  # OSC-8 link
        ("a\x9b31mb\x9d0;t\x9c", "ab"),  # 8-bit CSI and OSC
        ("invoice\u202egpj.exe", "invoicegpj.exe"),  # bidi override
        ("x\u2066y\u2069\u200fz\u061c", "xyz"),
        ("nul\x00bel\x07del\x7f", "nulbeldel"),
        ("ordinary id evt_abc-123 ünïcode", "ordinary id evt_abc-123 ünïcode"),
    ],
)
def test_safe_strips_terminal_controls(text: str, shown: str) -> None:
    assert safe(text) == shown


def test_lines_keep_newlines_and_tabs_only() -> None:
    assert safe("Traceback:\n\tline 1\r\x1b[31m", lines=True) == "Traceback:\n\tline 1"
    assert safe("a\nb") == "ab"


def test_markup_escapes_rich_markup() -> None:
    assert markup("[bold]x\x1b[2J") == "\\[bold]x"
