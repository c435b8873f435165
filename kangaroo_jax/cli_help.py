"""The --help style every argparse CLI of the project shares (chat, evaluate, niah, serve, the tools).

Long flags are `--kebab-case`; each option's help ends with its default ("(default: 64)", "(default: off)" for a
switch, "(default: none)") or "(required)", unless its text already says "(default..."; tests/test_cli_flag_style.py
holds every CLI to it.
"""

from __future__ import annotations

import argparse
import copy


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
  """--help with every option's default (or "required"); the description's and epilog's line breaks kept."""

  def _get_help_string(self, action):
    text = action.help or ""
    if "(default" in text or "(required" in text or not action.option_strings or action.default is argparse.SUPPRESS:
      return text
    if action.required:
      return f"{text} (required)".strip()
    default = "off" if action.default is False else "none" if action.default is None else "%(default)s"
    return f"{text} (default: {default})".strip()

  def _format_action(self, action):
    if not action.help and action.option_strings and action.default is not argparse.SUPPRESS:
      action = copy.copy(action)  # argparse prints nothing after an option without help, not even its default
      action.help = self._get_help_string(action)
    return super()._format_action(action)
