"""Pure construction of a ``codex exec --json`` argv (runtime ``codex``, Codex CLI 0.171).

What the CLI does with each part, checked against the scripted Responses API server:

* The prompt is the last positional argument; a resume is ``codex exec resume <thread_id>
  <prompt>`` (the thread id is what ``thread.started`` announced).
* ``-c developer_instructions=...`` reaches the model as a developer message on a new thread;
  on a resumed thread the CLI keeps the thread's first instructions and drops new ones. So a
  gate failure goes into the developer instructions of a cold start and into the prompt of a
  resume (``build_resume_prompt`` puts it there for every CLI).
* Everything else is a ``-c key=value`` override (TOML values), which ``exec`` and ``exec
  resume`` both accept, unlike ``--sandbox`` and ``-C``.
* Sandbox: ``workspace-write`` lets the agent edit its worktree and run the gates, but the
  CLI keeps ``.git`` read-only ("Unable to create .git/index.lock: Read-only file system"),
  so the worktree's git directory and the repository's are added as writable roots: the
  agent can commit, and still cannot write outside its worktree, its git directories and
  the temporary directories (test runners need those), nor reach the network.
  ``approval_policy="never"``: there is no person to ask in exec mode.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from runners.agents.argv import (
    assert_no_secrets,
    build_prompt,
    build_resume_prompt,
    gate_failure_section,
    render_template,
    template_values,
)
from runners.agents.mcp_config import SERVER_NAME
from runners.agents.spawn_spec import SpawnSpec

PROVIDER = "storyline"
"""The model provider a ``base_url`` defines (``-c model_providers.storyline...``)."""
TOKEN_VARIABLE = "STORYLINE_TOKEN"


def toml_value(value: str | Sequence[str]) -> str:
    """A TOML string or array of strings, for one ``-c key=value`` element.

    JSON string syntax is TOML's basic string, except that TOML refuses a raw DEL and
    ``\\u`` escapes of surrogates; both are written as escapes of scalar values.
    """
    if isinstance(value, str):
        text = value.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
        return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")
    return "[" + ", ".join(toml_value(v) for v in value) + "]"


def _override(key: str, value: str | Sequence[str]) -> list[str]:
    return ["-c", f"{key}={toml_value(value)}"]


def _user_set(argv: Sequence[str], *prefixes: str) -> bool:
    """True when the agent's own args already configure it (theirs are kept)."""
    return any(arg.startswith(prefixes) for arg in argv)


def sandbox_overrides(argv: Sequence[str], git_dirs: Sequence[Path]) -> list[str]:
    if _user_set(argv, "sandbox", "--sandbox", "-s", "--dangerously-bypass", "--full-auto"):
        return []
    out = _override("sandbox_mode", "workspace-write")
    if git_dirs:
        out += _override("sandbox_workspace_write.writable_roots", [str(d) for d in git_dirs])
    if not _user_set(argv, "approval_policy"):
        out += _override("approval_policy", "never")
    return out


def provider_overrides(spec: SpawnSpec) -> list[str]:
    """A model provider of its own for ``base_url``, speaking the Responses API."""
    agent = spec.agent
    if not agent.base_url:
        return []
    prefix = f"model_providers.{PROVIDER}"
    out = _override("model_provider", PROVIDER)
    out += _override(f"{prefix}.name", PROVIDER)
    out += _override(f"{prefix}.base_url", agent.base_url)
    out += _override(f"{prefix}.wire_api", "responses")
    if "OPENAI_API_KEY" in agent.agent_secrets() or "OPENAI_API_KEY" in spec.env:
        out += _override(f"{prefix}.env_key", "OPENAI_API_KEY")
    return out


def mcp_overrides(command: str, args: Sequence[str]) -> list[str]:
    """Register ``storyline mcp``; the token is forwarded from the agent's environment by
    name (``env_vars``), never written in argv or a file.

    ``required``: the CLI otherwise starts the server in the background and sends the first
    model request without its tools. ``default_tools_approval_mode = "approve"``: under
    ``approval_policy = "never"`` an MCP call needing approval is refused ("requires
    approval, but approval policy is never"); the tools are scoped to the attempt's story by
    its token, as Claude Code's ``mcp__storyline`` allowlist rule allows them.
    """
    prefix = f"mcp_servers.{SERVER_NAME}"
    return [
        *_override(f"{prefix}.command", command),
        *_override(f"{prefix}.args", list(args)),
        *_override(f"{prefix}.env_vars", [TOKEN_VARIABLE]),
        "-c",
        f"{prefix}.required=true",
        *_override(f"{prefix}.default_tools_approval_mode", "approve"),
    ]


def build_codex_argv(
    spec: SpawnSpec,
    *,
    git_dirs: Sequence[Path] = (),
    mcp_server: tuple[str, Sequence[str]] | None = None,
) -> list[str]:
    """The complete argv for a codex attempt (executable first). Pure.

    ``git_dirs``: the worktree's git directories (writable under the sandbox);
    ``mcp_server``: command and args of the attempt's ``storyline mcp``.
    """
    resuming = spec.resume_session_id is not None
    prompt = build_resume_prompt(spec) if resuming else build_prompt(spec)
    values = template_values(spec, prompt)
    args = [render_template(arg, values) for arg in spec.agent.args]
    if resuming:
        # The config validator guarantees args[0] == "exec".
        args.insert(1, "resume")
    argv = [render_template(spec.agent.command, values)]
    argv += sandbox_overrides(args, git_dirs)
    argv += provider_overrides(spec)
    if mcp_server is not None:
        argv += mcp_overrides(*mcp_server)
    if spec.gate_failure is not None and not resuming:
        argv += _override("developer_instructions", gate_failure_section(spec.gate_failure))
    # The subcommand first: codex takes -c before and after it, exec's own flags only after.
    argv[1:1] = args
    if spec.agent.model and "-m" not in args and "--model" not in args:
        argv += ["--model", spec.agent.model]
    if resuming:
        assert spec.resume_session_id is not None
        argv.append(spec.resume_session_id)
    # "--" is not accepted by exec resume; a prompt starting with "-" would read as a flag,
    # and a newline first keeps it a positional argument whatever the story says.
    argv.append(prompt if not prompt.startswith("-") else "\n" + prompt)
    assert_no_secrets(argv, spec.secret_values())
    return [arg.replace("\x00", "\ufffd") for arg in argv]
