"""Settings: the defaults the issues name, and flags winning over FLOWSVC_* variables."""

from __future__ import annotations

import pytest

from flowsvc.config import Settings, from_sources


def test_defaults() -> None:
    settings = from_sources({}, environ={})
    assert settings == Settings()
    assert settings.listen == "[::]:50051"
    assert settings.default_max_steps == 1000
    assert settings.grace_seconds == 10.0
    assert settings.db == "flowsvc.db"
    assert settings.db_synchronous == "FULL"


def test_flag_wins_over_environment_which_wins_over_default() -> None:
    environ = {"FLOWSVC_GRACE_SECONDS": "3", "FLOWSVC_TASK_MODULES": "a, b,,c"}
    settings = from_sources({"grace_seconds": "7"}, environ=environ)
    assert settings.grace_seconds == 7.0
    assert settings.task_modules == ("a", "b", "c")


@pytest.mark.parametrize(
    ("environ", "needle"),
    [
        ({"FLOWSVC_MAX_IN_FLIGHT": "0"}, "FLOWSVC_MAX_IN_FLIGHT"),
        ({"FLOWSVC_DB_SYNCHRONOUS": "OFF"}, "FLOWSVC_DB_SYNCHRONOUS"),
        ({"FLOWSVC_DB": " "}, "FLOWSVC_DB"),
        ({"FLOWSVC_LISTEN": "::1:50051"}, r"FLOWSVC_LISTEN.*brackets: \[::1\]:50051"),
        ({"FLOWSVC_LISTEN": "unix:"}, "FLOWSVC_LISTEN.*must name the socket"),
        ({"FLOWSVC_LISTEN": "unix-abstract:"}, "FLOWSVC_LISTEN.*must name the socket"),
        # Past what they are handed to: gRPC's C int, a date before year 1, a timer.
        ({"FLOWSVC_MAX_MESSAGE_BYTES": "3000000000"}, "FLOWSVC_MAX_MESSAGE_BYTES.*at most"),
        ({"FLOWSVC_RETENTION_SECONDS": "1e11"}, "FLOWSVC_RETENTION_SECONDS.*at most"),
        ({"FLOWSVC_RETENTION_SECONDS": "1e300"}, "FLOWSVC_RETENTION_SECONDS.*at most"),
        ({"FLOWSVC_GRACE_SECONDS": "1e300"}, "FLOWSVC_GRACE_SECONDS.*at most"),
        ({"FLOWSVC_DB_BUSY_TIMEOUT_MS": "99999999999"}, "FLOWSVC_DB_BUSY_TIMEOUT_MS"),
        ({"FLOWSVC_MAX_IN_FLIGHT": "3000000000"}, "FLOWSVC_MAX_IN_FLIGHT.*at most"),
        ({"FLOWSVC_MAX_STEPS_CAP": "500"}, "--max-steps-cap / FLOWSVC_MAX_STEPS_CAP"),
    ],
)
def test_bad_values_name_their_variable(environ: dict[str, str], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        from_sources({}, environ=environ)


@pytest.mark.parametrize(
    ("text", "level"),
    [
        ("warn", "WARNING"),
        ("WARN", "WARNING"),
        ("Warning", "WARNING"),
        ("debug", "DEBUG"),
        ("info", "INFO"),
        ("error", "ERROR"),
        ("fatal", "CRITICAL"),
        ("critical", "CRITICAL"),
        (" info ", "INFO"),
    ],
)
def test_log_level_takes_the_common_names_in_any_case(text: str, level: str) -> None:
    settings = from_sources({}, environ={"FLOWSVC_LOG_LEVEL": text})
    assert settings.log_level == level


def test_a_log_level_that_is_no_level_names_the_accepted_ones() -> None:
    with pytest.raises(ValueError, match=r"FLOWSVC_LOG_LEVEL='loud'.*DEBUG, INFO, WARNING"):
        from_sources({}, environ={"FLOWSVC_LOG_LEVEL": "loud"})
