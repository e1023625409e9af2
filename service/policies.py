"""The configuration values the domain's guards need, read from ``storyline.toml``."""

from __future__ import annotations

from domain.commands import Policy
from domain.config import StorylineConfig
from domain.epic_commands import EpicPolicy


def story_policy(config: StorylineConfig) -> Policy:
    return Policy(max_retries=config.max_retries, min_score=config.review.min_score)


def epic_policy(config: StorylineConfig) -> EpicPolicy:
    return EpicPolicy(
        max_plan_attempts=config.epic.max_plan_attempts,
        max_interviews=config.epic.max_interviews,
        min_score=config.review.min_score,
        max_evolutions=config.review.max_evolutions,
    )
