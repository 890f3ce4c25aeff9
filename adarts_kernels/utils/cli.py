"""Command-line helpers shared by the drivers and ``python -m adarts_kernels.profiling``."""
from __future__ import annotations

import argparse

__all__ = ["HelpFormatter"]


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's layout and ends every option's help with its default:
    ``(default: off)`` for a flag, ``(default: X)`` otherwise, unless the help already
    says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)) and action.nargs == 0:
            on = isinstance(action, argparse._StoreFalseAction)
            return f"{text} (default: {'on' if on else 'off'})"
        return f"{text} (default: %(default)s)"
