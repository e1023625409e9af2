"""Parsing the Claude CLI's stream-JSON output."""

from __future__ import annotations

import json
import logging

import pytest

from runners.agents import StreamJsonParser

INIT = {"type": "system", "subtype": "init", "session_id": "s-1", "model": "claude-x"}
RESULT = {
    "type": "result",
    "subtype": "success",
    "is_error": False,
    "session_id": "s-1",
    "num_turns": 7,
    "total_cost_usd": 0.4321,
    "usage": {
        "input_tokens": 10,
        "output_tokens": 500,
        "cache_creation_input_tokens": 1000,
        "cache_read_input_tokens": 20000,
    },
}


def assistant(msg_id: str, out_tokens: int) -> dict[str, object]:
    return {
        "type": "assistant",
        "session_id": "s-1",
        "message": {"id": msg_id, "usage": {"input_tokens": 3, "output_tokens": out_tokens}},
    }


def feed(parser: StreamJsonParser, *events: object) -> None:
    for event in events:
        parser.feed(event if isinstance(event, (str, bytes)) else json.dumps(event) + "\n")


def test_a_complete_run_yields_session_turns_tokens_and_cost() -> None:
    parser = StreamJsonParser()
    feed(parser, INIT, assistant("m1", 5), {"type": "user", "message": {}}, RESULT)
    assert parser.session_id == "s-1"
    assert parser.model == "claude-x"
    assert parser.result_subtype == "success"
    assert not parser.result_is_error
    assert parser.turns == 7
    assert parser.tokens_in == 10 + 1000 + 20000
    assert parser.tokens_out == 500
    assert parser.cost_usd == pytest.approx(0.4321)


def test_garbage_lines_are_skipped_and_logged_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    parser = StreamJsonParser()
    with caplog.at_level(logging.DEBUG, logger="runners.agents.stream_json"):
        feed(
            parser,
            "npm WARN deprecated something\n",
            INIT,
            '{"type": "assistant", "message": {"id": "m1", "usa\n',  # cut mid-line
            "[1, 2, 3]\n",
            "null\n",
            "\n",
            b"\xff\xfe not utf-8\n",
            RESULT,
        )
    assert parser.session_id == "s-1"
    assert parser.turns == 7
    assert parser.skipped_lines == 5
    assert "npm WARN deprecated" in caplog.text


def test_error_result_is_reported_with_its_session() -> None:
    parser = StreamJsonParser()
    feed(parser, INIT, {**RESULT, "subtype": "error_max_turns", "is_error": True})
    assert parser.result_is_error
    assert parser.result_subtype == "error_max_turns"
    assert parser.session_id == "s-1"


def test_is_error_with_a_success_subtype_counts_as_an_error() -> None:
    parser = StreamJsonParser()
    feed(parser, INIT, {**RESULT, "is_error": True, "result": "API Error: 529 Overloaded"})
    assert parser.result_is_error
    assert parser.result_text == "API Error: 529 Overloaded"


def test_a_run_killed_before_its_result_keeps_session_and_message_usage() -> None:
    parser = StreamJsonParser()
    # The CLI repeats a message's usage on each of its content lines: count it once.
    feed(parser, INIT, assistant("m1", 5), assistant("m1", 5), assistant("m2", 7))
    assert parser.session_id == "s-1"
    assert not parser.saw_result
    assert parser.result_subtype is None
    assert parser.cost_usd is None
    assert parser.turns == 3
    assert parser.tokens_out == 12
    assert parser.tokens_in == 6


def test_no_output_at_all_means_no_session() -> None:
    parser = StreamJsonParser()
    assert parser.session_id is None
    assert parser.turns is None
    assert parser.tokens_in == 0 and parser.tokens_out == 0


def test_the_latest_session_id_wins() -> None:
    parser = StreamJsonParser()
    feed(parser, INIT, {**RESULT, "session_id": "s-2"})
    assert parser.session_id == "s-2"


def test_bogus_numbers_do_not_poison_the_totals() -> None:
    parser = StreamJsonParser()
    bogus = {
        **RESULT,
        "num_turns": "many",
        "total_cost_usd": "NaN",
        "usage": {"input_tokens": -5, "output_tokens": True, "cache_read_input_tokens": 2.0},
    }
    feed(parser, INIT, bogus)
    assert parser.turns == 0
    assert parser.cost_usd is None
    assert parser.tokens_in == 2
    assert parser.tokens_out == 0
