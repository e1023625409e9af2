"""What the board's fragments show: columns paged per stage, filtered by text and epic.

Rows come from the board projection through ``ReadModels.board`` (keyset pages); counts of
an unfiltered board come from the metrics projection. Functions here block: call them from
a worker thread.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from api.routes_stories import _row
from domain.ids import is_epic_id
from domain.stages import Stage
from projections.read_models import MAX_PAGE

DEFAULT_LIMIT = 50
"""Cards per column on a page: ten thousand stories stay a small answer."""


@dataclass(frozen=True)
class BoardFilter:
    text: str | None = None
    epic: str | None = None

    @classmethod
    def of(cls, text: str | None, epic: str | None) -> BoardFilter:
        # An empty field in the form means "no filter", not "an empty name".
        return cls(text.strip() or None if text else None, epic or None)

    @property
    def active(self) -> bool:
        return self.text is not None or self.epic is not None

    def matches(self, row: dict[str, Any]) -> bool:
        if self.epic is not None and row.get("epic") != self.epic:
            return False
        if self.text is not None:
            needle = self.text.casefold()
            return needle in str(row["id"]).casefold() or needle in str(row["name"]).casefold()
        return True

    def query(self) -> dict[str, str]:
        found: dict[str, str] = {}
        if self.text is not None:
            found["text"] = self.text
        if self.epic is not None:
            found["epic"] = self.epic
        return found


@dataclass
class Column:
    stage: str
    cards: list[dict[str, Any]]
    total: int
    more: bool
    offset: int
    limit: int
    filters: BoardFilter

    @property
    def next_offset(self) -> int:
        return self.offset + len(self.cards)

    @property
    def more_href(self) -> str:
        """The board page showing the next cards of this column (a real link)."""
        query = {"stage": self.stage, "offset": str(self.next_offset), "limit": str(self.limit)}
        return "/?" + urlencode({**query, **self.filters.query()})

    @property
    def more_fragment(self) -> str:
        """The fragment with the next cards, which the script appends to the column."""
        query = {"offset": str(self.next_offset), "limit": str(self.limit)}
        return f"/ui/fragments/column/{self.stage}?" + urlencode({**query, **self.filters.query()})


def _pages(read_models: Any, stage: str, size: int) -> Iterator[list[dict[str, Any]]]:
    cursor: str | None = None
    while True:
        rows, cursor = read_models.board(stage, size, cursor)
        yield [_row(r) for r in rows]
        if not cursor:
            return


def column(
    read_models: Any,
    stage: str,
    filters: BoardFilter,
    limit: int,
    offset: int,
    counts: dict[str, int] | None,
) -> Column:
    """One page of a stage's column and how many stories the column holds in all.

    Unfiltered, only the rows up to the page's end are read (keyset pages), and the total
    comes from ``counts``. Filtered, the whole stage is read once and matched here: the
    projection has no text index, and a filter is the rarer, narrower view.
    """
    if not filters.active:
        wanted = offset + limit
        found: list[dict[str, Any]] = []
        cursor: str | None = None
        while len(found) < wanted:
            rows, cursor = read_models.board(stage, min(MAX_PAGE, wanted - len(found)), cursor)
            found.extend(_row(r) for r in rows)
            if not cursor:
                break
        page = found[offset:wanted]
        total = (counts or {}).get(stage, len(found))
        more = cursor is not None and len(found) >= wanted
        return Column(stage, page, max(total, offset + len(page)), more, offset, limit, filters)
    matching = [row for rows in _pages(read_models, stage, MAX_PAGE) for row in rows]
    matching = [row for row in matching if filters.matches(row)]
    page = matching[offset : offset + limit]
    more = offset + limit < len(matching)
    return Column(stage, page, len(matching), more, offset, limit, filters)


def stage_counts(read_models: Any) -> dict[str, int]:
    per_stage = read_models.metrics().get("stories_per_stage", {})
    return {str(stage): int(count) for stage, count in per_stage.items()}


def decorate(
    read_models: Any,
    cards: list[dict[str, Any]],
    now: datetime | None = None,
    holders: dict[str, str] | None = None,
) -> None:
    """Adds what a card shows beyond its board row: the running agent's elapsed time, and
    the worker holding a live lease on the story (scale-out; ``holders``, story -> worker)."""
    now = now or datetime.now(UTC)
    for card in cards:
        card["holder"] = (holders or {}).get(str(card["id"]))
        card["agent_since"] = None
        card["agent_elapsed"] = None
        card["epic_link"] = is_epic_id(card["epic"]) if card.get("epic") else False
        running = card.get("running_agent")
        if not running:
            continue
        # Running agents are few (the runners' concurrency): one indexed read each.
        runs = read_models.agent_runs(card["id"], 1)
        if not runs:
            continue
        since = runs[0].get("started_at") or runs[0].get("requested_at")
        if since:
            moment = datetime.fromisoformat(since)
            card["agent_since"] = since
            card["agent_elapsed"] = max((now - moment).total_seconds(), 0.0)


def board(
    read_models: Any,
    filters: BoardFilter,
    limit: int,
    offset: int,
    stage: str | None,
    holders: dict[str, str] | None = None,
) -> tuple[list[Column], int]:
    """Every stage's column (``offset`` applies to ``stage``'s, or to all when None), and
    the board projection's position read before the rows (the live stream starts there,
    so nothing committed while the page was read is missed)."""
    position = int(read_models.positions(["board"])["board"])
    counts = None if filters.active else stage_counts(read_models)
    columns = []
    for each in Stage:
        skip = offset if stage is None or stage == each.value else 0
        col = column(read_models, each.value, filters, limit, skip, counts)
        decorate(read_models, col.cards, holders=holders)
        columns.append(col)
    return columns, position


def epic_options(
    summaries: list[dict[str, Any]], columns: list[Column], selected: str | None
) -> list[dict[str, str]]:
    """The epic filter's choices: the epics, the epic labels on the cards shown, and the
    current choice (a story's epic is free text when it is not an epic's id)."""
    options: dict[str, str] = {}
    for row in summaries:
        options[str(row["id"])] = f"{row['id']} · {row['name']}"
    for col in columns:
        for card in col.cards:
            label = card.get("epic")
            if label and label not in options:
                options[str(label)] = str(label)
    if selected and selected not in options:
        options[selected] = selected
    return [{"id": key, "label": label} for key, label in options.items()]


__all__ = [
    "DEFAULT_LIMIT",
    "BoardFilter",
    "Column",
    "board",
    "column",
    "decorate",
    "epic_options",
    "stage_counts",
]
