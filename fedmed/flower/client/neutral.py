"""What a site's refusal tells the coordinator: the reason and the fix, in site-neutral words.

A refusal's full text (the site's absolute paths, its ledger's id) stays in the site's own log; the
coordinator needs to know what is wrong and what the site's admin must do, not how the site's disk
is laid out. Paths become their last part (`privacy-ledger.sqlite`), ledger ids are withheld.
"""

from __future__ import annotations

import re

# An absolute POSIX path: a '/' that does not continue a word, URL or other path, then at least one more part.
_PATH = re.compile(r"(?<![\w/.:~-])/(?:[^\s/'\"`,;()\[\]<>]+/)+[^\s/'\"`,;()\[\]<>]*")
# Ledger ids are uuid4 hex (fedmed.privacy.ledger_file); app digests (64) and layout digests (16) are the
# coordinator's own and stay.
_LEDGER_ID = re.compile(r"(?<![0-9a-f])[0-9a-f]{32}(?![0-9a-f])")
WITHHELD = "(withheld)"


def site_neutral(text: str) -> str:
    """`text` without the site's paths and ledger ids."""
    return _LEDGER_ID.sub(WITHHELD, _PATH.sub(_last_part, text))


def _last_part(match: re.Match[str]) -> str:
    path = match.group(0)
    stripped = path.rstrip(".")  # a sentence's full stop is not part of the path
    name = next((part for part in reversed(stripped.split("/")) if part), "")
    return name + path[len(stripped) :]
