"""What the board shows of worker runners (scale-out): the Workers page, the holder of a
story on its page, and the holder badge on cards.

Read from the registry and the lease table (``service.workers``), which are empty on a
single machine: then cards carry no badge and the story page says nothing of holders.
Functions here block: call them from a worker thread.
"""

from __future__ import annotations

from typing import Any

from api.routes_workers import lease_json, state_of_worker, worker_json
from service.application import StorylineApplication
from service.workers import Workers


def holders(app: StorylineApplication) -> dict[str, str]:
    """Story id -> the worker holding a live lease on it."""
    return Workers(app).holders()


def workers_page(app: StorylineApplication) -> dict[str, Any]:
    workers = Workers(app)
    rows = workers.rows()
    return {
        "workers": [{**worker_json(row), "state": state_of_worker(row)} for row in rows],
        "leases": [lease_json(lease) for lease in workers.leases()],
    }


def story_holder(
    app: StorylineApplication, shown: dict[str, Any], as_of: bool
) -> dict[str, Any] | None:
    """Who holds the story: the worker with a live lease on it now, else (or, as of a past
    position, only) the holder its log records, shown as its last holder."""
    if not as_of:
        for lease in Workers(app).leases():
            if lease.story_id == shown["id"]:
                return {"worker": lease.holder, "generation": lease.generation, "live": True}
    if shown.get("holder"):
        generation = int(shown.get("holder_generation") or 0)
        return {"worker": shown["holder"], "generation": generation, "live": False}
    return None


__all__ = ["holders", "story_holder", "workers_page"]
