"""A review verdict as an evaluator submits it, and the rule that passes or fails it.

An evaluator (a story's reviewer, or an epic's) judges each acceptance criterion: met or
unmet, a score from 0 to 1, and the evidence it rests on (a file and line, a test name, a
command's output). A verdict must judge every criterion exactly once, by its index. The
verdict's score is the mean of the criteria's scores, computed here rather than taken from
the evaluator, so one rule scores every verdict. A verdict passes when every criterion is
met and the score is at least the project's ``min_score``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from domain.errors import InvalidField

MAX_EVIDENCE = 4_000
MAX_SUMMARY = 4_000


def _text(value: str) -> str:
    for ch in value:
        if ch in "\n\t":
            continue
        if ord(ch) < 32 or ord(ch) == 127:
            raise ValueError(f"contains a control character ({ord(ch):#04x})")
    if not value.strip():
        raise ValueError("must not be blank")
    return value


class CriterionJudgement(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    criterion: Annotated[int, Field(ge=0, le=99)]
    """The criterion's index in the story's (or epic's) acceptance criteria, from 0."""
    met: bool
    score: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
    evidence: Annotated[str, Field(min_length=1, max_length=MAX_EVIDENCE)]

    @field_validator("evidence")
    @classmethod
    def _evidence(cls, value: str) -> str:
        return _text(value)


class Verdict(BaseModel):
    """What an evaluator submits (the ``submit_review`` tool's argument)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    criteria: Annotated[list[CriterionJudgement], Field(min_length=1, max_length=100)]
    summary: Annotated[str, Field(max_length=MAX_SUMMARY)] = ""

    @field_validator("summary")
    @classmethod
    def _summary(cls, value: str) -> str:
        return _text(value) if value else value


def parse_verdict(raw: Any, criteria: list[str]) -> Verdict:
    """The verdict in ``raw`` for these criteria, or :class:`InvalidField` saying what is wrong.

    Every criterion is judged exactly once: a verdict that skips one could pass a story on
    the criteria it chose to look at."""
    try:
        verdict = Verdict.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ("data", *first["loc"])
        raise InvalidField(loc, f"the verdict is malformed: {first['msg']}") from None
    seen = [j.criterion for j in verdict.criteria]
    out_of_range = sorted({i for i in seen if i >= len(criteria)})
    if out_of_range:
        raise InvalidField(
            ("data", "criteria"),
            f"criterion {out_of_range[0]} does not exist: there are {len(criteria)} "
            f"(indexes 0 to {len(criteria) - 1})",
        )
    twice = sorted({i for i in seen if seen.count(i) > 1})
    if twice:
        raise InvalidField(("data", "criteria"), f"criterion {twice[0]} is judged twice")
    missing = sorted(set(range(len(criteria))) - set(seen))
    if missing:
        raise InvalidField(
            ("data", "criteria"),
            "every criterion needs a judgement; missing: " + ", ".join(map(str, missing)),
        )
    return verdict


def verdict_score(verdict: Verdict) -> float:
    return round(sum(j.score for j in verdict.criteria) / len(verdict.criteria), 4)


def judgements(verdict: Verdict, criteria: list[str]) -> list[dict[str, Any]]:
    """The verdict as stored: in criterion order, each with the criterion's text."""
    return [
        {
            "criterion": j.criterion,
            "text": criteria[j.criterion],
            "met": j.met,
            "score": j.score,
            "evidence": j.evidence,
        }
        for j in sorted(verdict.criteria, key=lambda j: j.criterion)
    ]


def verdict_passes(judged: list[dict[str, Any]], score: float, min_score: float) -> bool:
    return all(j["met"] for j in judged) and score >= min_score


def unmet(judged: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [dict(j) for j in judged if not j["met"]]


@dataclass(frozen=True)
class Judged:
    """A verdict checked against its criteria, as the events store it."""

    criteria: list[dict[str, Any]]
    score: float
    summary: str

    @property
    def met(self) -> int:
        return sum(1 for j in self.criteria if j["met"])

    def tally(self) -> str:
        return f"{self.met} of {len(self.criteria)} criteria met, score {self.score:.2f}"


def judge(raw: Any, criteria: list[str]) -> Judged:
    """``raw`` parsed and checked (:func:`parse_verdict`), judged in criterion order, scored."""
    verdict = parse_verdict(raw, criteria)
    return Judged(judgements(verdict, criteria), verdict_score(verdict), verdict.summary)
