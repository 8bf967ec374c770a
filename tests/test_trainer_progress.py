"""Progress: plain log lines for log collectors, a rich bar on a terminal."""

from __future__ import annotations

import io
import logging
import re

import pytest
from rich.console import Console

from trainer import progress as progress_module
from trainer.progress import Progress, duration, epoch_callback


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _terminal() -> tuple[Console, io.StringIO]:
    screen = io.StringIO()
    return Console(file=screen, force_terminal=True, width=140, color_system=None), screen


def test_duration_reads_as_a_person_says_it():
    assert [duration(s) for s in (7, 90, 7500, -3)] == ["7s", "1m30s", "2h05m", "0s"]


def test_off_a_terminal_a_log_line_every_interval_with_rate_and_eta(caplog):
    clock = Clock()
    caplog.set_level(logging.INFO, logger="trainer.progress")
    progress = Progress("bottleneck features: train", 1000, "images", interval_s=30, clock=clock, console=False)
    assert not progress.on_terminal
    clock.now += 10
    progress.add(100)  # before the first interval: quiet
    clock.now += 20
    progress.add(150)
    clock.now += 5
    progress.add(50)  # within the next interval: quiet
    assert [r.getMessage() for r in caplog.records] == [
        "bottleneck features: train, 250 of 1,000 images (25%), 8 images/s, ETA 1m30s"]
    assert "\r" not in caplog.text


def test_without_a_total_the_line_has_no_eta():
    clock = Clock()
    progress = Progress("evaluation", None, "images", clock=clock, console=False)
    progress.add(40)
    clock.now += 4
    assert progress.line() == "evaluation, 40 images, 10 images/s"


def test_captured_stderr_is_no_terminal_so_the_default_is_log_lines():
    assert progress_module.terminal_console() is None
    assert not Progress("x", 10).on_terminal


def test_on_a_terminal_a_bar_with_done_of_total_rate_and_time_left_closing_at_the_total(caplog):
    console, screen = _terminal()
    caplog.set_level(logging.INFO, logger="trainer.progress")
    progress = Progress("bottleneck features: train", 64, "images", console=console)
    assert progress.on_terminal and progress_module._live is progress
    for _ in range(4):
        progress.add(16)
    assert not progress.on_terminal and progress_module._live is None  # closed by itself at the total
    last = [line for line in re.split(r"[\r\n]", screen.getvalue()) if "bottleneck" in line][-1]  # the final redraw
    assert "bottleneck features: train" in last and "64/64 images" in last and "100%" in last
    assert "images/s" in last and "left" in last
    assert caplog.records == []  # the bar replaces the log lines


def test_a_new_bar_closes_one_left_open():
    console, _ = _terminal()
    first = Progress("fine-tune cache: train", 100, console=console)
    first.add(10)  # a step that failed half-way never closes it
    second = Progress("evaluation", None, console=console)
    assert not first.on_terminal and progress_module._live is second
    with second:
        second.add(5)
    assert progress_module._live is None


def test_the_epoch_callback_draws_each_epoch_on_a_terminal():
    import keras
    import numpy as np

    console, screen = _terminal()
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    model.fit(np.zeros((32, 2)), np.zeros((32, 1)), batch_size=8, epochs=2, verbose=0,
              callbacks=[epoch_callback("search", 32, console=console)])
    text = screen.getvalue()
    assert "search epoch 1/2" in text and "search epoch 2/2" in text and "32/32 images" in text
    assert progress_module._live is None


@pytest.fixture(autouse=True)
def _no_bar_left():
    yield
    if progress_module._live is not None:
        progress_module._live.close()
