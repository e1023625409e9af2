"""Pure construction of an agent's prompt and argv from a :class:`SpawnSpec`.

No I/O and no shell: every value lands in exactly one argv element, whatever it contains
(spaces, quotes, newlines, ``$(...)``), so user-written story text can never become a flag
or a command.
"""

from __future__ import annotations

import math
import re
import shlex
from collections.abc import Callable, Mapping

from runners.agents.mcp_config import MCP_CONFIG_FLAG
from runners.agents.spawn_spec import SpawnSpec

GATE_FAILURE_PROMPT_BYTES = 3_000
GATE_FAILURE_HEADER = "Your previous run's quality gates failed:\n"
SYSTEM_PROMPT_FLAG = "--append-system-prompt"
MAX_TURNS_FLAG = "--max-turns"
MAX_BUDGET_FLAG = "--max-budget-usd"
MODEL_FLAG = "--model"
RESUME_FLAG = "--resume"
ALLOWED_TOOLS_FLAG = "--allowedTools"

CODER_PROMPT = (
    "You are working on story {{story_id}} in the git worktree {{worktree_path}}. "
    "Implement it, make the quality gates pass, and commit your work on the current branch."
)
MERGEMASTER_PROMPT = (
    "You are the mergemaster for story {{story_id}}. Your working directory "
    "{{worktree_path}} is the merge workspace: a checkout of {{base_branch}} on a detached "
    "HEAD, where the squash merge of the story's branch stopped on conflicts. You do not "
    "write the feature; you only resolve this merge."
)

PLANNER_PROMPT = (
    "You are the planner of epic {{story_id}}. Your working directory {{worktree_path}} is a "
    "read-only checkout of {{base_branch}}: read the code, change nothing. Split the goal "
    "below into subtasks that separate coding agents can do in parallel, each in its own "
    "branch, merged one by one into the epic's integration branch; then the union is judged "
    "by the epic's gates."
)
PLANNER_INSTRUCTIONS = (
    "# How to report\n\n"
    "Submit exactly one plan with the storyline MCP tool `submit_plan`: `subtasks`, each with "
    "`name`, `description`, `acceptance_criteria` (at least one), `depends_on` (names of "
    "other subtasks that must land first) and `footprint` (the paths it expects to touch; a "
    "directory ends in `/`). Subtasks that may run at the same time must not share footprint "
    "paths: make one depend on the other, or merge them. When the goal has no parallelism "
    "worth the coordination, submit `prefer_single_session: true` with no subtasks. A "
    "refused plan comes back with its problems: fix them and submit again. Without the MCP "
    'tools, POST `{"event": "submit_plan", "data": {"plan": {...}}}` to '
    "$STORYLINE_URL/epics/$STORYLINE_STORY_ID/transitions with the header "
    "`Authorization: Bearer $STORYLINE_TOKEN`."
)

EVALUATOR_PROMPT = (
    "You are the evaluator of story {{story_id}}. Your working directory {{worktree_path}} "
    "is the story's worktree at the commit its coder delivered, whose quality gates passed. "
    "You do not write code: you judge whether the work does what each acceptance criterion "
    "below says, with evidence. Anything you change in the worktree is thrown away when you "
    "exit."
)
EVALUATOR_INSTRUCTIONS = (
    "# How to report\n\n"
    "Read the diff and the code it touches; run the tests or commands you need. Then submit "
    "your verdict exactly once with the storyline MCP tool `submit_review`: `criteria`, one "
    'entry per acceptance criterion above, each `{"criterion": <its number above, from 0>, '
    '"met": true|false, "score": <0 to 1>, "evidence": "<file and line, test name, or '
    'command and its output>"}`, and a one-paragraph `summary`. Judge every criterion, each '
    "once. The story merges only when every criterion is met and the mean score reaches the "
    "project's minimum; otherwise it goes back to its coder with your unmet criteria and "
    "evidence, so make the evidence something a coder can act on. Without the MCP tools, POST "
    '`{"event": "submit_review", "data": {"attempt": $STORYLINE_ATTEMPT, "criteria": [...], '
    '"summary": "..."}}` to $STORYLINE_URL/stories/$STORYLINE_STORY_ID/transitions with the '
    "header `Authorization: Bearer $STORYLINE_TOKEN`. Exiting without a verdict counts as a "
    "failed attempt."
)
REVIEW_FAILURE_HEADER = "# Review sent your work back"

_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_]+)\s*\}\}")


class SecretInArgvError(ValueError):
    """A secret from the spawn environment ended up in the argv (which ``ps`` shows to all)."""


def tail_bytes(text: str, limit: int = GATE_FAILURE_PROMPT_BYTES) -> str:
    """The end of ``text`` that fits in ``limit`` UTF-8 bytes, never splitting a character.

    The tail is kept because compilers and test runners print the decisive error last.
    """
    if limit <= 0:
        return ""
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:
        # Lone surrogates (output decoded with surrogateescape) cannot be UTF-8 encoded.
        data = text.encode("utf-8", "backslashreplace")
    if len(data) <= limit:
        return data.decode("utf-8")
    cut = data[-limit:]
    start = 0
    # Skip continuation bytes (0b10xxxxxx): they belong to a character cut in half.
    while start < len(cut) and (cut[start] & 0xC0) == 0x80:
        start += 1
    return cut[start:].decode("utf-8")


def render_template(template: str, values: Mapping[str, str]) -> str:
    """Substitute ``{{name}}`` placeholders in one pass.

    One pass matters: a story description containing ``{{prompt}}`` must stay literal text
    instead of being expanded again. Unknown placeholders are left as written so a typo is
    visible in the agent log rather than silently becoming an empty string.
    """

    def replace(match: re.Match[str]) -> str:
        return values.get(match.group(1), match.group(0))

    return _PLACEHOLDER.sub(replace, template)


def template_values(spec: SpawnSpec, prompt: str = "") -> dict[str, str]:
    return {
        "story_id": spec.story_id,
        "worktree_path": str(spec.cwd),
        "base_branch": spec.base_branch,
        "prompt": prompt,
        "model": spec.agent.model or "",
    }


def _story_block(spec: SpawnSpec) -> str:
    story = spec.story
    what = "Epic" if spec.role == "planner" else "Story"
    parts = [f"# {what} {spec.story_id}: {story.name}"]
    if story.description.strip():
        parts.append(story.description.strip())
    if story.acceptance_criteria:
        if spec.role == "evaluator":
            # Numbered from 0: the verdict names each criterion by this number.
            criteria = "\n".join(f"{i}. {c}" for i, c in enumerate(story.acceptance_criteria))
        else:
            criteria = "\n".join(f"- {c}" for c in story.acceptance_criteria)
        parts.append(f"## Acceptance criteria\n{criteria}")
    return "\n\n".join(parts)


def _review_diff_block(spec: SpawnSpec) -> str:
    commit = f" (commit {spec.review_commit})" if spec.review_commit else ""
    diff = spec.review_diff if spec.review_diff is not None else ""
    return (
        f"# The change to judge{commit}\n\n"
        f"`git diff {spec.base_branch}...HEAD` in your working directory:\n\n"
        f"```diff\n{diff.strip() or '(empty diff)'}\n```"
    )


def review_failure_section(spec: SpawnSpec) -> str | None:
    """The unmet criteria and the evaluator's evidence, for the coder's next run."""
    failure = spec.review_failure
    if failure is None:
        return None
    lines = [
        REVIEW_FAILURE_HEADER,
        "",
        f"An evaluator reviewed your committed work against the acceptance criteria and sent "
        f"it back (score {failure.score:.2f}, the project needs {failure.min_score:.2f} with "
        "every criterion met). Your gates passed; what is missing is below. Fix it, keep the "
        "gates green, and commit.",
        "",
    ]
    for gap in failure.gaps:
        lines.append(f"- Criterion {gap.criterion}: {gap.text}")
        lines.append(f"  Score: {gap.score:.2f}")
        evidence = tail_bytes(gap.evidence, 1_500).strip().replace("\n", "\n    ")
        lines.append(f"  Evidence: {evidence}")
    if failure.summary.strip():
        lines += ["", f"The evaluator's summary: {tail_bytes(failure.summary, 1_500).strip()}"]
    return "\n".join(lines)


HUNKS_LOST_PURPOSE = "hunks_lost"
"""The mergemaster's purpose when its previous resolution dropped hunks (set by the merger)."""


def _hunks_lost_block(spec: SpawnSpec) -> str:
    files = "\n".join(f"- {path}" for path in spec.conflicts) or "- (see the list below)"
    endpoint = "$STORYLINE_URL/stories/$STORYLINE_STORY_ID/transitions"
    return (
        "# Your resolution dropped hunks\n\n"
        f"The resolution of the merge of feature/story-{spec.story_id} onto {spec.base_branch} "
        "was checked before landing and sent back: it leaves out lines that one side "
        "changed (side story: the story's branch; side base: what the base gained since the "
        "story branched), and no drop was declared. Your working directory still holds that "
        "resolution as one commit on top of the base (HEAD is detached: do not create, switch "
        "or push branches). Files with missing hunks:\n"
        f"{files}\n\n"
        "1. Put back what belongs in the result, then `git add` and `git commit --amend`: the "
        "resolution must stay exactly ONE commit on top of the base, so amend it; a second "
        "commit is refused.\n"
        "2. A hunk left out on purpose (the other side replaces it, or it no longer applies) "
        "must be declared, each one, with the storyline MCP tool "
        "`declare_dropped_hunk(file, side, hunk, reason)`, copying file, side and the `@@ ... @@` "
        "header exactly as listed below. Without the MCP tools, POST "
        '`{"event": "declare_dropped_hunk", "reason": "why", "data": {"file": "...", '
        '"side": "story|base", "hunk": "@@ ... @@"}}` '
        f"to {endpoint} with the header `Authorization: Bearer $STORYLINE_TOKEN`. A declared "
        "drop stays in the story's history for people to review.\n"
        "3. Report `report_merge_resolved` once the amended commit and the declarations are "
        'in (or POST `{"event": "merge_resolved"}`), or `report_merge_gave_up` with a '
        "reason a person can act on. The check runs again before the merge lands.\n"
        "Exiting without a verdict counts as a failed attempt.\n\n"
        f"{(spec.conflict_details or '').strip()}"
    ).rstrip()


def _conflict_block(spec: SpawnSpec) -> str:
    if spec.purpose == HUNKS_LOST_PURPOSE:
        return _hunks_lost_block(spec)
    files = "\n".join(f"- {path}" for path in spec.conflicts) or "- (see the details below)"
    branch = f"feature/story-{spec.story_id}"
    return (
        "# Merge conflicts\n\n"
        f"The squash merge of feature/story-{spec.story_id} onto {spec.base_branch} stopped "
        "on conflicts in your working directory (HEAD is detached: do not create, switch or "
        "push branches). Conflicted files:\n"
        f"{files}\n\n"
        "1. Resolve every conflict marker, keeping the intent of both sides.\n"
        "   Before it lands, storyline checks that every line either side changed is still "
        "in your result. A hunk you leave out on purpose must be declared with the MCP tool "
        "`declare_dropped_hunk(file, side, hunk, reason)`; before you commit, the headers of "
        f"side `base` are those of `git diff -U0 $(git merge-base HEAD {branch}) HEAD -- FILE`, "
        f"of side `story` those of `git diff -U0 $(git merge-base HEAD {branch}) {branch} -- "
        "FILE`.\n"
        "2. Run the quality gates if you can.\n"
        "3. `git add` the resolved files and `git commit` (one commit on the detached HEAD).\n"
        "4. Report your verdict with the storyline MCP tools: `report_merge_resolved` once "
        "the merge is committed, or `report_merge_gave_up` with a reason a person can act "
        "on when it cannot be resolved. Without those tools, POST "
        '`{"event": "merge_resolved"}` (or `{"event": "merge_gave_up", "reason": "..."}`) '
        "to $STORYLINE_URL/stories/$STORYLINE_STORY_ID/transitions with the header "
        "`Authorization: Bearer $STORYLINE_TOKEN`.\n"
        "Exiting without a verdict counts as a failed attempt.\n\n"
        f"{(spec.conflict_details or '').strip()}"
    ).rstrip()


def _leftovers_block(spec: SpawnSpec) -> str:
    listed = "\n".join(f"- {path}" for path in spec.uncommitted_paths[:50])
    more = len(spec.uncommitted_paths) - 50
    if more > 0:
        listed += f"\n- ... and {more} more"
    return (
        "Your previous run ended with uncommitted changes in the worktree; the quality gates "
        "only judge committed work. Uncommitted files:\n"
        f"{listed or '- (run git status)'}\n"
        "Review them, `git add` what belongs to the story (remove what does not) and "
        "`git commit` on the current branch."
    )


def _previous_cap_block(spec: SpawnSpec) -> str | None:
    if spec.purpose.endswith("max_turns"):
        return (
            "Your previous attempt stopped at its turn cap before finishing. This is a new "
            "session: the worktree holds what it did (see git status and git log). Continue "
            "from there in fewer, larger steps, and commit as you go."
        )
    return None


EPIC_EVALUATION_PURPOSE = "evaluate_epic"
"""An epic's evaluator (role ``evaluator``, ``story_id`` the epic's): its own prompt."""
EPIC_EVALUATOR_PROMPT = (
    "You are the evaluator of epic {{story_id}}. Your working directory {{worktree_path}} is "
    "a detached checkout of the epic's integration commit: the work of all its stories "
    "together, whose union gates passed. You do not write code: you judge whether that "
    "result does what each of the epic's acceptance criteria says, with evidence. Anything "
    "you change in the working directory is thrown away."
)
EPIC_EVALUATOR_INSTRUCTIONS = (
    "# How to report\n\n"
    "Read the diff and the code it touches; run the tests or commands you need. Then submit "
    "your verdict exactly once with the storyline MCP tool `submit_evaluation`: `criteria`, "
    'one entry per acceptance criterion above, each `{"criterion": <its number, from 0>, '
    '"met": true|false, "score": <0 to 1>, "evidence": "<file and line, test name, or '
    'command and its output>"}`, and a one-paragraph `summary`. Judge every criterion, each '
    "once. Under the project's threshold the epic's planner proposes follow-up stories from "
    "your unmet criteria and evidence. Without the MCP tools, POST "
    '`{"event": "submit_evaluation", "data": {"attempt": $STORYLINE_ATTEMPT, "criteria": '
    '[...], "summary": "..."}}` to $STORYLINE_URL/epics/$STORYLINE_STORY_ID/transitions with '
    "the header `Authorization: Bearer $STORYLINE_TOKEN`. Exiting without a verdict counts "
    "as a failed run."
)


def _epic_evaluator_prompt(spec: SpawnSpec) -> str:
    # The brief (the story text's description) holds the goal, the numbered criteria and
    # the integration's diff, assembled by the epic runner.
    opening = spec.agent.prompt if spec.agent.prompt is not None else EPIC_EVALUATOR_PROMPT
    parts = [render_template(opening, template_values(spec)).strip()]
    parts.append(f"# Epic {spec.story_id}: {spec.story.name}\n\n{spec.story.description.strip()}")
    parts.append(EPIC_EVALUATOR_INSTRUCTIONS)
    if spec.project_prompt and spec.project_prompt.strip():
        parts.append(spec.project_prompt.strip())
    return "\n\n".join(p for p in parts if p)


def build_prompt(spec: SpawnSpec) -> str:
    """The full cold-start prompt: epic context, agent prompt, story, conflicts, project file."""
    parts: list[str] = []
    if spec.purpose == EPIC_EVALUATION_PURPOSE:
        return _epic_evaluator_prompt(spec)
    if spec.epic_context and spec.epic_context.strip():
        parts.append(
            "# Epic context\n\nThis story belongs to an epic. Respect its context:\n\n"
            f"---\n{spec.epic_context.strip()}\n---"
        )
    opening = spec.agent.prompt
    if opening is None:
        opening = {
            "mergemaster": MERGEMASTER_PROMPT,
            "planner": PLANNER_PROMPT,
            "evaluator": EVALUATOR_PROMPT,
        }.get(spec.role, CODER_PROMPT)
    rendered = render_template(opening, template_values(spec)).strip()
    if rendered:
        parts.append(rendered)
    parts.append(_story_block(spec))
    if spec.role == "planner":
        parts.append(PLANNER_INSTRUCTIONS)
    if spec.role == "evaluator":
        parts.append(_review_diff_block(spec))
        parts.append(EVALUATOR_INSTRUCTIONS)
    review = review_failure_section(spec)
    if review:
        parts.append(review)
    if spec.role == "mergemaster" or spec.conflict_details:
        parts.append(_conflict_block(spec))
    if spec.purpose == "commit_leftovers":
        parts.append(_leftovers_block(spec))
    cap = _previous_cap_block(spec)
    if cap:
        parts.append(cap)
    if spec.project_prompt and spec.project_prompt.strip():
        parts.append(spec.project_prompt.strip())
    return "\n\n".join(parts)


def build_resume_prompt(spec: SpawnSpec) -> str:
    """The prompt for a resumed session.

    The resumed session already holds the full prompt, so repeating it only makes the agent
    re-read everything. It must not be empty either: the Claude CLI refuses ``--resume`` with
    an empty ``-p`` prompt. The gate failure travels in the system prompt either way.
    """
    parts = [f"Continue your prior work on story {spec.story_id}."]
    if spec.purpose == "commit_leftovers":
        parts.append(_leftovers_block(spec))
    if spec.gate_failure is not None:
        # In the prompt as well as the system prompt: Claude Code (2.1.332 at least) drops
        # --append-system-prompt when it resumes a session, so a resumed retry would never
        # see the failure otherwise.
        parts.append(
            "The quality gates failed. The end of their output:\n"
            f"```\n{tail_bytes(spec.gate_failure)}\n```\n"
            "Fix the cause and commit."
        )
    review = review_failure_section(spec)
    if review:
        # The resumed session saw the criteria, not the evaluator's verdict on its work.
        parts.append(review)
    if spec.role == "mergemaster" and spec.conflict_details:
        parts.append(_conflict_block(spec))
    return "\n\n".join(parts)


def gate_failure_section(gate_output: str) -> str:
    return GATE_FAILURE_HEADER + tail_bytes(gate_output)


# --- argv editing -------------------------------------------------------------------------


def _find_flag(argv: list[str], flag: str) -> list[tuple[int, bool]]:
    """Positions of ``flag``: (index, is_equals_form). Index 0 (the executable) is skipped."""
    found: list[tuple[int, bool]] = []
    for i, arg in enumerate(argv[1:], start=1):
        if arg == flag:
            found.append((i, False))
        elif arg.startswith(flag + "="):
            found.append((i, True))
    return found


def _flag_value(argv: list[str], index: int, equals: bool) -> str | None:
    if equals:
        return argv[index].split("=", 1)[1]
    return argv[index + 1] if index + 1 < len(argv) else None


def _set_flag_value(argv: list[str], index: int, equals: bool, value: str) -> None:
    flag = argv[index].split("=", 1)[0]
    if equals:
        argv[index] = f"{flag}={value}"
    elif index + 1 < len(argv):
        argv[index + 1] = value
    else:
        argv.append(value)


def inject_gate_failure(argv: list[str], gate_output: str) -> None:
    """Add the failure section to the system prompt argument, in place.

    Appends to an existing ``--append-system-prompt`` value rather than adding a second
    flag: the CLI keeps only one value, so a second pair would drop the configured prompt.
    The last occurrence is the one a CLI parser keeps, so that is the one extended.
    """
    section = gate_failure_section(gate_output)
    found = _find_flag(argv, SYSTEM_PROMPT_FLAG)
    if found:
        index, equals = found[-1]
        current = _flag_value(argv, index, equals)
        value = f"{current}\n\n{section}" if current else section
        _set_flag_value(argv, index, equals, value)
        return
    argv.extend([SYSTEM_PROMPT_FLAG, section])


def _parse_int(value: str | None) -> float:
    try:
        return int(value) if value is not None else math.inf
    except ValueError:
        return math.inf


def _parse_float(value: str | None) -> float:
    try:
        parsed = float(value) if value is not None else math.inf
    except ValueError:
        return math.inf
    return parsed if math.isfinite(parsed) else math.inf


def format_usd(value: float) -> str:
    """Plain decimal notation: ``str(1e-05)`` would hand the CLI an exponent."""
    text = f"{value:.6f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def cap_flag(
    argv: list[str],
    flag: str,
    cap: float,
    parse: Callable[[str | None], float],
    fmt: Callable[[float], str],
) -> None:
    """Make ``flag`` at most ``cap``, in place: lower values stay, missing flags are added.

    Unparseable values count as unlimited and are replaced, so a typo can never lift a cap.
    Every occurrence is capped because CLIs differ in whether the first or last one wins.
    """
    found = _find_flag(argv, flag)
    if not found:
        argv.extend([flag, fmt(cap)])
        return
    for index, equals in found:
        if parse(_flag_value(argv, index, equals)) > cap:
            _set_flag_value(argv, index, equals, fmt(cap))


def cap_turns(argv: list[str], max_turns: int) -> None:
    cap_flag(argv, MAX_TURNS_FLAG, max_turns, _parse_int, lambda v: str(int(v)))


def cap_budget(argv: list[str], max_budget_usd: float) -> None:
    cap_flag(argv, MAX_BUDGET_FLAG, max_budget_usd, _parse_float, format_usd)


def effective_max_turns(spec: SpawnSpec) -> int | None:
    """The turn cap the spawn runs under: configured, lowered by the fixup cap."""
    caps = [c for c in (spec.agent.max_turns,) if c is not None]
    if spec.fixup_pending:
        caps.append(spec.fixup_caps.max_turns)
    return min(caps) if caps else None


def effective_max_budget(spec: SpawnSpec) -> float | None:
    caps = [c for c in (spec.agent.max_budget_usd,) if c is not None]
    if spec.fixup_pending:
        caps.append(spec.fixup_caps.max_budget_usd)
    return min(caps) if caps else None


def permission_rules(spec: SpawnSpec) -> list[str]:
    """Claude Code ``--allowedTools`` rules: the agent's own, then one per gate command.

    A gate command becomes a prefix rule, ``Bash(python -m pytest -q:*)``, so the agent
    may run exactly what the server will run (with extra arguments, e.g. one test file).
    A command containing a comma cannot be expressed in the comma-joined flag and is left
    out rather than split into two wrong rules.
    """
    rules = list(spec.agent.allowed_tools)
    if spec.agent.allow_gate_commands:
        for argv in spec.gate_commands:
            rule = f"Bash({shlex.join(argv)}:*)"
            if rule not in rules:
                rules.append(rule)
    return [r for r in rules if r and "," not in r]


def assert_no_secrets(argv: list[str], secrets: list[str]) -> None:
    """Refuse an argv that contains a secret: any local user can read argv through ``ps``."""
    for arg in argv:
        for secret in secrets:
            if secret and secret in arg:
                raise SecretInArgvError(
                    "refusing to start the agent: a secret from its environment appears in its "
                    "command line (check the agent's args and prompt templates)"
                )


def build_argv(spec: SpawnSpec) -> list[str]:
    """The complete argv for a CLI agent attempt (executable first). Pure."""
    prompt = build_resume_prompt(spec) if spec.resume_session_id else build_prompt(spec)
    values = template_values(spec, prompt)
    argv = [render_template(spec.agent.command, values)]
    argv.extend(render_template(arg, values) for arg in spec.agent.args)

    if spec.agent.model and not _find_flag(argv, MODEL_FLAG):
        argv.extend([MODEL_FLAG, spec.agent.model])
    if spec.agent.runtime == "claude-code":
        rules = permission_rules(spec)
        # One element in the '=' form: the flag is variadic in the CLI, and a separate
        # value list could swallow a following positional argument.
        if rules:
            argv.append(f"{ALLOWED_TOOLS_FLAG}={','.join(rules)}")
        if spec.mcp_config is not None and not _find_flag(argv, MCP_CONFIG_FLAG):
            argv.append(f"{MCP_CONFIG_FLAG}={spec.mcp_config}")
    # Configured limits and fixup caps both only ever lower a value already in the args:
    # whoever wrote the lower number meant it.
    if spec.agent.max_turns is not None:
        cap_turns(argv, spec.agent.max_turns)
    if spec.agent.max_budget_usd is not None:
        cap_budget(argv, spec.agent.max_budget_usd)
    if spec.fixup_pending:
        cap_turns(argv, spec.fixup_caps.max_turns)
        cap_budget(argv, spec.fixup_caps.max_budget_usd)
    # Injected even when resuming: the resumed conversation predates the gate run.
    if spec.gate_failure is not None:
        inject_gate_failure(argv, spec.gate_failure)
    if spec.resume_session_id:
        found = _find_flag(argv, RESUME_FLAG)
        if found:
            for index, equals in found:
                _set_flag_value(argv, index, equals, spec.resume_session_id)
        else:
            argv.extend([RESUME_FLAG, spec.resume_session_id])
    assert_no_secrets(argv, spec.secret_values())
    # execve cannot carry a NUL byte; a story text containing one must still be spawnable.
    return [arg.replace("\x00", "\ufffd") for arg in argv]
