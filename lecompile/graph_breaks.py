"""The graph breaks Dynamo met while handing a backend its graphs, for the report.

Dynamo counts every break by its message in ``torch._dynamo.utils.counters["graph_break"]``, for
the whole process. A :class:`GraphBreaks` remembers the counts when its backend is made and, at
each graph the backend receives, takes the breaks counted since: those of the frames compiled for
this backend (``torch.compile`` makes the backend before it traces the first frame, and Dynamo
counts a break before it hands over the graph that ends there). Breaks of other compilations after
the backend's last graph are never taken.
"""

from __future__ import annotations

import logging
from typing import Dict

from torch._dynamo.utils import counters

log = logging.getLogger("lecompile")


def _counts() -> Dict[str, int]:
    return dict(counters["graph_break"])


def summary(message: str) -> str:
    """A break's kind and Dynamo's explanation, on one line."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    explanation = next((line for line in lines[1:] if line.startswith("Explanation:")), "")
    text = f"{lines[0]} ({explanation.removeprefix('Explanation:').strip()})" if explanation else lines[0]
    return text if len(text) <= 240 else text[:237] + "..."


class GraphBreaks:
    """Graph breaks counted since the backend was made, by :func:`summary`."""

    def __init__(self):
        self._seen = _counts()
        self.found: Dict[str, int] = {}

    def collect(self) -> None:
        """Add the breaks counted since the last call (or since the backend was made)."""
        now = _counts()
        for message, count in now.items():
            new = count - self._seen.get(message, 0)
            if new > 0:
                key = summary(message)
                if key not in self.found:
                    log.info("lecompile: Dynamo broke the graph: %s", key)
                self.found[key] = self.found.get(key, 0) + new
        self._seen = now

    def note(self) -> str:
        """The report's note ("" without breaks)."""
        if not self.found:
            return ""
        reasons = "; ".join(f"{reason} x{count}" for reason, count in self.found.items())
        return (f"Dynamo broke the forward at {sum(self.found.values())} graph break(s); the rewrites apply within "
                f"each piece, and a block cut by a break stays dense (TORCH_LOGS=graph_breaks shows where): {reasons}")
