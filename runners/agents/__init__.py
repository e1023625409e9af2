"""Agent runtimes behind one interface.

A runner builds a :class:`SpawnSpec`, picks a runtime with :func:`runtime_for` and calls
``start(spec)``; the returned :class:`RunningAgent` is waited on or killed, and its
:class:`AgentResult` is recorded as the AgentExited event.
"""

from __future__ import annotations

from typing import Any

from domain.config import AgentConfig
from runners.agents.argv import (
    GATE_FAILURE_HEADER,
    SecretInArgvError,
    build_argv,
    build_prompt,
    build_resume_prompt,
    tail_bytes,
)
from runners.agents.cli_runtime import (
    CliRunningAgent,
    CliRuntime,
    agent_environment,
    group_alive,
    kill_process_group,
    process_alive,
    process_identity,
)
from runners.agents.codex_runtime import CodexRuntime
from runners.agents.openai_runtime import OpenAIRunningAgent, OpenAIRuntime
from runners.agents.spawn_spec import (
    OUTCOMES,
    AgentResult,
    AgentRole,
    AgentRuntime,
    AgentStartError,
    Outcome,
    RunningAgent,
    SpawnSpec,
    StoryText,
)
from runners.agents.stream_json import StreamJsonParser, Usage


def runtime_for(agent: AgentConfig, **options: Any) -> AgentRuntime:
    """The runtime for an agent's configured ``runtime``; ``options`` go to its constructor."""
    if agent.runtime == "openai":
        return OpenAIRuntime(**options)
    if agent.runtime == "codex":
        return CodexRuntime(**options)
    return CliRuntime(**options)


__all__ = [
    "GATE_FAILURE_HEADER",
    "OUTCOMES",
    "AgentResult",
    "AgentRole",
    "AgentRuntime",
    "AgentStartError",
    "CliRunningAgent",
    "CliRuntime",
    "OpenAIRunningAgent",
    "OpenAIRuntime",
    "Outcome",
    "RunningAgent",
    "SecretInArgvError",
    "SpawnSpec",
    "StoryText",
    "StreamJsonParser",
    "Usage",
    "agent_environment",
    "build_argv",
    "build_prompt",
    "build_resume_prompt",
    "group_alive",
    "kill_process_group",
    "process_alive",
    "process_identity",
    "runtime_for",
    "tail_bytes",
]
