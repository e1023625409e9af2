"""What the ``storyline mcp`` prompts tell an agent, per role (pure text from a story snapshot,
or for the planner and the epic's evaluator from its epic).

The mergemaster works somewhere unusual (a detached HEAD in a merge workspace, not its
story's branch) and must report a verdict; the coder mostly needs to know where its gate
failures are and that notes exist; the planner needs the rules a plan is judged by
(footprints, dependencies, when to run the goal as one session). Each text names the tools
by the names agents see.
"""

from __future__ import annotations

from typing import Any

MAX_LISTED_CONFLICTS = 50


def _conflicts(story: dict[str, Any]) -> str:
    paths = [str(p) for p in story.get("conflicts") or []]
    if not paths:
        return "(none recorded: run `git status` to see them)"
    listed = "\n".join(f"- {p}" for p in paths[:MAX_LISTED_CONFLICTS])
    more = len(paths) - MAX_LISTED_CONFLICTS
    return listed + (f"\n- ... and {more} more (see `git status`)" if more > 0 else "")


def mergemaster_prompt(story: dict[str, Any]) -> str:
    sid = story.get("id", "?")
    branch = story.get("feature_branch") or f"feature/story-{sid}"
    if story.get("merge_failure_kind") == "hunks_lost":
        return _hunks_lost_prompt(story, sid)
    return f"""You are the mergemaster for story {sid} ("{story.get("name", "")}").

Where you are: your working directory is the story's merge workspace, a separate git
checkout on a detached HEAD at the tip of the base branch. The squash merge of {branch}
onto it stopped on conflicts and was left in place. Do not create, switch or push branches:
storyline lands your commit on the base branch itself after re-running the merge gates.

Conflicted files:
{_conflicts(story)}

What to do:
1. Resolve the conflict markers in each file, keeping the intent of both sides.
2. `git add` the resolved files and `git commit` (on the detached HEAD).
3. Report the verdict with a tool (it is required: without one, storyline retries you):
   - report_merge_resolved(summary): the conflicts are resolved and committed.
   - report_merge_gave_up(reason): it cannot be resolved without a person; say why.
Before it lands, storyline checks that every line either side changed is still in your
result. A hunk you leave out on purpose must be declared before step 3 with
declare_dropped_hunk(file, side, hunk, reason); an undeclared drop sends the merge back.
Useful: gate_output (what the merge printed), get_story, story_history, and add_note for
anything a person should read later."""


def _hunks_lost_prompt(story: dict[str, Any], sid: str) -> str:
    return f"""You are the mergemaster for story {sid} ("{story.get("name", "")}").

Your resolution of its merge was sent back before landing: it leaves out lines one side
changed, and no drop was declared. Your working directory (the merge workspace, detached
HEAD) still holds that resolution as one commit on top of the base branch.

Files with missing hunks:
{_conflicts(story)}

Call gate_output: merge_failure_details lists each missing hunk (file, side, the
`@@ ... @@` header, and the lines). Then for each one, either:
- put it back, `git add` and `git commit --amend` (the resolution must stay exactly ONE
  commit on top of the base: amend, never add a second commit), or
- if leaving it out is right, declare it with declare_dropped_hunk(file, side, hunk,
  reason), copying file, side and header exactly; the reason stays in the story's history.
Then report_merge_resolved(summary); the check runs again. report_merge_gave_up(reason)
when a person must decide."""


def coder_prompt(story: dict[str, Any]) -> str:
    sid = story.get("id", "?")
    retry = int(story.get("retry_count") or 0)
    gates = (
        f"Your previous run's gates failed (retry {retry}): call gate_output first and fix "
        "what it reports."
        if retry
        else "Call gate_output after a failed run to read what the gates printed."
    )
    return f"""You are the coder for story {sid} ("{story.get("name", "")}").

Work in your working directory (the story's worktree, on its feature branch) and commit
your changes there; storyline runs the quality gates on your commits when you exit.

Gate output: {gates} It returns the tail of the last gate run (failing tests, linter
errors) and, after a failed merge, what the merge gates printed.
{_review_gaps(story)}

Notes: add_note(text) records a note on the story's audit trail (shown in its history with
you as the actor). Use it for what a reviewer should know: a decision, a workaround, a
test you could not make pass. get_story and story_history show the story and what happened
so far."""


def _review_gaps(story: dict[str, Any]) -> str:
    """The verdict that sent the story back from review, for its coder (empty if none)."""
    failure = story.get("last_review_failure")
    if not failure or not int(story.get("retry_count") or 0):
        return ""
    lines = [
        "",
        f"Review: an evaluator sent your work back (score {float(failure.get('score', 0)):.2f}, "
        f"needed {float(failure.get('min_score', 0)):.2f} with every criterion met). Fix these:",
    ]
    for gap in failure.get("gaps") or []:
        lines.append(
            f"- criterion {gap.get('criterion')}: {gap.get('text', '')} (score "
            f"{float(gap.get('score', 0)):.2f})\n  evidence: {gap.get('evidence', '')}"
        )
    if failure.get("summary"):
        lines.append(f"The evaluator's summary: {failure['summary']}")
    return "\n".join(lines) + "\n"


def _numbered(criteria: list[Any]) -> str:
    return "\n".join(f"{i}. {c}" for i, c in enumerate(criteria)) or "(none)"


def evaluator_prompt(story: dict[str, Any]) -> str:
    sid = story.get("id", "?")
    base = story.get("target_branch") or "the base branch"
    criteria = list(story.get("acceptance_criteria") or [])
    return f"""You are the evaluator for story {sid} ("{story.get("name", "")}").

Where you are: your working directory is the story's worktree at the commit its coder
delivered; its quality gates passed. You judge, you do not code: anything you change there
is thrown away when you exit.

The story:
{story.get("description") or "(no description)"}

Acceptance criteria, numbered from 0 (the verdict names each by its number):
{_numbered(criteria)}

What to do:
1. Read the change: `git diff {base}...HEAD` (with `--stat` for an overview) and the code
   it touches. Run the tests or commands you need.
2. For every criterion decide met or unmet, a score from 0 to 1, and the evidence: a file
   and line, a test name, or a command and its output. A coder acts on unmet ones, so make
   the evidence precise.
3. Call submit_review exactly once with criteria (one entry per criterion above:
   criterion, met, score, evidence) and a one-paragraph summary. Every criterion must be
   judged once; a malformed verdict is refused with the reason, fix it and call again.
The story merges only when every criterion is met and the mean score reaches the project's
minimum; otherwise it goes back to its coder with your unmet criteria. Exiting without a
verdict counts as a failed attempt. get_story and story_history show the story; add_note
records anything a person should read."""


def _interview(epic: dict[str, Any]) -> str:
    rounds = [r for r in epic.get("interview") or [] if r.get("answers")]
    if not rounds:
        return ""
    lines = ["Questions asked before and the answers (plan with them):"]
    for r in rounds:
        answers = list(r.get("answers") or [])
        for i, question in enumerate(r.get("questions") or []):
            answer = answers[i] if i < len(answers) else "(no answer)"
            lines += [f"- Q: {question}", f"  A: {answer}"]
    return "\n".join(lines) + "\n\n"


def _evolution(epic: dict[str, Any]) -> str:
    evolutions = epic.get("evolutions") or []
    if not evolutions:
        return ""
    last = evolutions[-1]
    lines = [
        f"This is evolution {last.get('evolution')}: the integrated work was evaluated at "
        f"score {float(last.get('after_score') or 0.0):.2f} (best so far "
        f"{float(last.get('best_score') or 0.0):.2f}), short of the goal. Propose follow-up "
        "subtasks for these gaps only; they build on the best integration so far:",
    ]
    for gap in last.get("gaps") or []:
        lines.append(
            f"- criterion {gap.get('criterion')}: {gap.get('text', '')} (score "
            f"{float(gap.get('score') or 0.0):.2f}); evidence: {gap.get('evidence', '')}"
        )
    return "\n".join(lines) + "\n\n"


def planner_prompt(epic: dict[str, Any]) -> str:
    eid = epic.get("id", "?")
    criteria = "\n".join(f"- {c}" for c in epic.get("acceptance_criteria") or []) or "- (none)"
    problems = [str(p) for p in epic.get("last_plan_problems") or []]
    last = (
        "Your previous plan was refused; fix every one of these first:\n"
        + "\n".join(f"- {p}" for p in problems)
        + "\n\n"
        if problems
        else ""
    )
    before = _interview(epic) + _evolution(epic) + last
    return f"""You are the planner for epic {eid} ("{epic.get("name", "")}").

Goal:
{epic.get("goal", "(call get_epic)")}

Acceptance criteria of the whole goal:
{criteria}

{before}Your job is a plan, not code: do not edit files. Read the repository to see where the
work goes, then call submit_plan once with:
- subtasks: each becomes a story that a coder does alone on its own branch, then merges
  into the epic's integration branch. Give each a unique name, a description the coder can
  act on without you, and its own acceptance criteria.
- depends_on: names of subtasks that must merge before this one starts (it then builds on
  their work). Subtasks without a path of dependencies between them run at the same time.
- footprint: the paths each subtask expects to touch (files, or directories ending in "/").
  Two subtasks that may run at the same time must not share a path: their merges would
  conflict. Make one depend on the other, or merge them into one subtask.
- prefer_single_session: true when the goal has no parallelism worth the coordination (it
  is small, or every piece touches the same files). The goal then runs as one story. A plan
  with one subtask, or whose footprints all overlap, runs that way too.
- rationale: one paragraph on why this split.

After every story merges, the union of their work is checked as a whole against the goal's
acceptance criteria, so the subtasks together must cover all of them.

When the goal is too vague to plan (you would have to guess what is wanted), call
ask_questions(questions) instead of submit_plan, and exit: a person answers, and the next
planner attempt gets every question and answer. Ask only what changes the plan; the
rounds of questions are few.

submit_plan answers accepted true or false. When false, its problems say what to change;
fix them and submit again (each refusal counts toward a small number of attempts). Use
get_epic to re-read the goal and the last problems, and add_note for anything a person
should know about the plan."""


def epic_evaluator_prompt(epic: dict[str, Any]) -> str:
    """The epic's evaluator: judge the integrated result, criterion by criterion."""
    eid = epic.get("id", "?")
    criteria = (
        "\n".join(f"{i}. {c}" for i, c in enumerate(epic.get("acceptance_criteria") or []))
        or "(none: call get_epic)"
    )
    commit = epic.get("integration_commit") or "(see get_epic)"
    fork = epic.get("fork_point") or "the fork point"
    return f"""You are the evaluator of epic {eid} ("{epic.get("name", "")}"), evolution \
{epic.get("evolution", 0)}.

Goal:
{epic.get("goal", "(call get_epic)")}

Your working directory is a detached checkout of the epic's integration commit {commit}:
the work of all its stories together, whose union gates passed. You do not write code
(anything you change is thrown away): you judge whether that result does what each
acceptance criterion says. `git diff {fork} HEAD` shows everything the epic changed.

Acceptance criteria, numbered from 0:
{criteria}

Read the change and the code around it; run the tests or commands you need. Then call
submit_evaluation once: `criteria` with one entry per criterion above,
{{"criterion": <number>, "met": true|false, "score": <0 to 1>, "evidence": "<file and line,
test name, or command and its output>"}}, and a one-paragraph `summary`. Judge every
criterion, each once. Under the project's threshold the planner proposes follow-up stories
from your unmet criteria and evidence, so make the evidence something a planner can act on.
Exiting without a verdict counts as a failed run."""
