"""The project's one output channel: nerfstudio's rich ``CONSOLE``, a line at a time.

Lines are printed whole (never re-wrapped, so paths and commands stay copyable) and never read as rich markup
(brackets in paths and messages stay as they are). Errors that end a command go to stderr as one paragraph
(``trainer.exit_with_message``); warnings about the code's use stay Python warnings.
"""

from __future__ import annotations

from typing import Optional

from nerfstudio.utils.rich_utils import CONSOLE


def say(line: str, style: Optional[str] = None) -> None:
    """Print ``line`` on nerfstudio's console (``style``: a rich style such as ``"yellow"``)."""
    CONSOLE.print(line, style=style, soft_wrap=True, markup=False, highlight=False)
