"""Whether output reaches a person's terminal, and the live display that long steps report to.

A live display (a progress bar redrawn in place) is for a person watching a terminal; a pipe, a file
or a service journal gets plain lines only, never ANSI codes or carriage returns.

A step deep inside a round (a site's local epochs, its validation) cannot know whether a display is on
screen: in the in-process engine the sites run in the process that draws the round bar, elsewhere (Ray
actors, deployed sites) they do not. So the step announces what it is doing here, and this says whether
a display took it; if none did, the step writes a log line instead.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import IO

ActivitySink = Callable[[str | None], None]

_sinks: list[ActivitySink] = []


def is_terminal(stream: IO[str] | None) -> bool:
    """True for an interactive terminal that can redraw a line; False for a pipe, a file or TERM=dumb."""
    if stream is None or os.environ.get("TERM") == "dumb":
        return False
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # closed or not a real file (a test's capture)
        return False


def display_on() -> bool:
    """Whether a live display in this process shows `show_activity` texts now."""
    return bool(_sinks)


def show_activity(text: str | None) -> bool:
    """Show what a long step is doing now (None: it ended) on the live display; False when none is on screen."""
    if not _sinks:
        return False
    _sinks[-1](text)
    return True


@contextlib.contextmanager
def activity_display(sink: ActivitySink) -> Iterator[None]:
    """While inside, `show_activity` texts go to `sink` (a live display's status line)."""
    _sinks.append(sink)
    try:
        yield
    finally:
        _sinks.remove(sink)
