"""Suite-wide fixtures."""

from __future__ import annotations

import logging

import pytest

_PACKAGE_LOGGERS = ("lightning.pytorch", "lightning_lora", "lightning.fabric")


@pytest.fixture(autouse=True)
def restore_logger_levels():
    """Code under test (benchmark scripts run in-process, the CLI) may quiet loggers; later tests must still see logs."""
    loggers = [logging.getLogger(name) for name in _PACKAGE_LOGGERS]
    saved = [(logger.level, logger.propagate, logger.disabled) for logger in loggers]
    yield
    for logger, (level, propagate, disabled) in zip(loggers, saved):
        logger.setLevel(level)
        logger.propagate, logger.disabled = propagate, disabled
