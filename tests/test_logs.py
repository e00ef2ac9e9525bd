"""The log handler: JSON lines, written in batches, never lost or reordered."""

from __future__ import annotations

import io
import json
import logging
import time

import pytest

from flowsvc.logs import MAX_TRACEBACK_CHARS, BatchedStreamHandler, JsonFormatter


@pytest.fixture
def logged():
    """A logger whose lines go to a BatchedStreamHandler over a StringIO."""
    stream = io.StringIO()
    handler = BatchedStreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger(f"flowsvc.test_logs.{id(stream)}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    yield logger, stream, handler
    logger.removeHandler(handler)
    handler.close()


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_line_below_warning_waits_for_its_batch(logged) -> None:
    logger, stream, handler = logged
    handler.FLUSH_SECONDS = 60  # this instance's flusher will not come during the test
    logger.info("flow ended", extra={"flow_id": "f1"})
    assert stream.getvalue() == ""
    handler.flush()
    assert [(x["msg"], x["flow_id"]) for x in lines(stream)] == [("flow ended", "f1")]


def test_the_flusher_writes_a_waiting_line_without_a_flush_call(logged) -> None:
    logger, stream, _ = logged
    logger.info("flow ended", extra={"flow_id": "f1"})
    deadline = time.monotonic() + 10
    while not stream.getvalue() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [(x["msg"], x["flow_id"]) for x in lines(stream)] == [("flow ended", "f1")]


def test_a_warning_writes_it_and_every_line_before_it_at_once(logged) -> None:
    logger, stream, _ = logged
    logger.info("one")
    logger.debug("two")
    logger.warning("three")
    assert [x["msg"] for x in lines(stream)] == ["one", "two", "three"]


def test_a_full_batch_is_written_at_once_in_order(logged) -> None:
    logger, stream, handler = logged
    for i in range(handler.BATCH_LINES):
        logger.info("line", extra={"i": i})
    assert [x["i"] for x in lines(stream)] == list(range(handler.BATCH_LINES))


def test_flush_writes_what_waits_and_the_line_shows_the_values_when_logged(logged) -> None:
    logger, stream, handler = logged
    fields = {"n": 1}
    logger.info("count %s", fields)
    fields["n"] = 2  # changed after the call: the line keeps what was logged
    handler.flush()
    assert lines(stream)[0]["msg"] == "count {'n': 1}"


def test_after_a_flush_later_lines_are_flushed_again(logged) -> None:
    logger, stream, _ = logged
    for name in ("first", "second"):
        logger.info(name)
        deadline = time.monotonic() + 10
        while name not in stream.getvalue() and time.monotonic() < deadline:
            time.sleep(0.01)
    assert [x["msg"] for x in lines(stream)] == ["first", "second"]


class Broken(io.StringIO):
    """stderr whose reader went away."""

    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")


def test_a_broken_stream_is_logging_s_problem_not_the_caller_s(monkeypatch) -> None:
    monkeypatch.setattr(logging, "raiseExceptions", False)  # as handleError would print
    handler = BatchedStreamHandler(Broken())
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("flowsvc.test_logs.broken")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        logger.warning("task raised")  # written at once: the write fails, quietly
        logger.info("flow ended")
        handler.flush()  # the flusher's path
        for i in range(handler.BATCH_LINES):  # a full batch: written from emit too
            logger.info("line", extra={"i": i})
        assert len(handler._lines) < handler.BATCH_LINES  # what failed is not kept
    finally:
        logger.removeHandler(handler)


def test_a_huge_exception_text_is_cut_in_its_line_keeping_where_and_what(logged) -> None:
    # A task raising ValueError("x" * 100_000) logged a 100 kB line ("task raised"); one of
    # megabytes would have gone to the log whole.
    logger, stream, _ = logged

    def deep() -> None:
        raise ValueError("start " + "x" * 100_000 + " end")

    try:
        deep()
    except ValueError:
        logger.warning("task raised", exc_info=True, extra={"task": "t"})
    (line,) = lines(stream)
    text = line["traceback"]
    assert len(text) < MAX_TRACEBACK_CHARS + 100
    assert text.startswith("Traceback (most recent call last)") and "in deep" in text
    assert "characters cut" in text and text.endswith(" end")
    assert len(stream.getvalue()) < MAX_TRACEBACK_CHARS + 1000


def test_a_short_traceback_is_kept_whole(logged) -> None:
    logger, stream, _ = logged
    try:
        raise ValueError("short")
    except ValueError:
        logger.warning("task raised", exc_info=True)
    (line,) = lines(stream)
    assert line["traceback"].endswith("ValueError: short") and "cut" not in line["traceback"]


def _strict(line: str) -> dict:
    """`line` as JSON that any parser reads: NaN and Infinity are not JSON."""

    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(line, parse_constant=refuse)


def test_a_nan_or_infinity_or_a_cycle_in_an_extra_field_still_makes_a_json_line(logged) -> None:
    # A task's own line with a float('nan') in `extra` was written as `"ratio": NaN`,
    # which strict JSON parsers (Go's, jq's, most log pipelines') refuse.
    logger, stream, handler = logged
    cycle: list[object] = []
    cycle.append(cycle)
    logger.info(
        "measured", extra={"ratio": float("nan"), "top": [float("-inf")], "loop": cycle, "n": 1}
    )
    handler.flush()
    (line,) = [_strict(text) for text in stream.getvalue().splitlines()]
    assert (line["msg"], line["ratio"], line["top"], line["n"]) == ("measured", "nan", "[-inf]", 1)
    assert line["loop"] == "[[...]]"


def test_an_extra_field_named_like_a_line_s_own_does_not_replace_it(logged) -> None:
    # A task logging extra={"level": "gold", "ts": ...} rewrote the line's own level and
    # time: a pipeline filtering on level saw "gold", and the line's time was the task's.
    logger, stream, handler = logged
    logger.error("member not found", extra={"level": "gold", "ts": "2020-01-01", "logger": "mine"})
    handler.flush()
    (line,) = lines(stream)
    assert (line["level"], line["logger"]) == ("error", logger.name)
    assert line["ts"] != "2020-01-01"
    assert (line["extra_level"], line["extra_ts"], line["extra_logger"]) == (
        "gold",
        "2020-01-01",
        "mine",
    )


def test_a_message_whose_args_do_not_fit_it_is_still_a_json_line() -> None:
    # logger.info("%d items", "three") in a task made the formatter raise: logging printed
    # its multi-line "--- Logging error ---" on stderr, and the line itself was lost.
    record = logging.makeLogRecord(
        {"name": "acme", "levelname": "INFO", "msg": "%d items", "args": ("three",), "task": "t"}
    )
    line = json.loads(JsonFormatter().format(record))
    assert (line["msg"], line["args"], line["task"]) == ("%d items", "('three',)", "t")


def test_a_non_string_key_or_a_deep_nesting_in_an_extra_field_still_makes_a_json_line(
    logged, capsys: pytest.CaptureFixture[str]
) -> None:
    # A task's extra={"pairs": {("a", "b"): 2}} (TypeError) or a structure nested past the
    # recursion limit (RecursionError) lost its line, with a '--- Logging error ---'
    # dump on stderr, and the emit's clean-up dropped the lines waiting to be written
    # before it: the INFO lines of every other flow of the last 0.1 s.
    logger, stream, handler = logged
    for n in range(3):
        logger.info("before %d", n)
    deep: list[object] = []
    inner = deep
    # Past Python 3.13's C recursion limit too (json and repr nest 5,000 deep there).
    for _ in range(50_000):
        inner.append([])
        inner = inner[0]  # type: ignore[assignment]
    logger.info("counted", extra={"pairs": {("a", "b"): 2}, "n": 1})
    logger.info("walked", extra={"tree": deep})
    handler.flush()
    written = [_strict(text) for text in stream.getvalue().splitlines()]
    assert [line["msg"] for line in written] == [
        "before 0",
        "before 1",
        "before 2",
        "counted",
        "walked",
    ]
    assert (written[3]["pairs"], written[3]["n"]) == ("{('a', 'b'): 2}", 1)
    assert written[4]["tree"] == "<list that cannot be written>"
    assert "Logging error" not in capsys.readouterr().err


def test_a_line_that_cannot_be_formatted_does_not_take_the_waiting_lines_with_it(
    logged, capsys: pytest.CaptureFixture[str]
) -> None:
    logger, stream, handler = logged

    class Broken(JsonFormatter):
        def format(self, record: logging.LogRecord) -> str:
            if record.msg == "broken":
                raise RuntimeError("cannot format")
            return super().format(record)

    handler.setFormatter(Broken())
    logger.info("kept 1")
    logger.info("broken")
    logger.info("kept 2")
    handler.flush()
    assert [line["msg"] for line in lines(stream)] == ["kept 1", "kept 2"]
    assert "cannot format" in capsys.readouterr().err  # logging's own report of it
