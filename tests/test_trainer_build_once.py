"""A cache is built once per distributed job: the chief builds it, a worker waits, and never forever."""

from __future__ import annotations

import logging

from trainer.data.build_once import build_once


class FakeCache:
    def __init__(self, path):
        self.path = str(path)
        self.built = 0
        self.marker_seen_while_building = None

    def ready(self):
        return self.built > 0

    def ensure(self):
        import os

        self.marker_seen_while_building = os.path.exists(self.path + ".building")
        self.built += 1


def test_the_chief_builds_with_a_marker_that_it_removes_after(tmp_path):
    cache = FakeCache(tmp_path / "cache")
    build_once(cache, "chief")
    assert cache.built == 1 and cache.marker_seen_while_building
    assert not (tmp_path / "cache.building").exists()


def test_a_worker_that_sees_no_marker_builds_its_own_after_its_patience(tmp_path, caplog):
    cache = FakeCache(tmp_path / "cache")
    with caplog.at_level(logging.INFO, logger="trainer.data.features"):
        build_once(cache, "worker", patience_s=0.2, poll_s=0.05)
    assert cache.built == 1
    assert any("none after" in r.getMessage() for r in caplog.records)


def test_a_worker_does_not_wait_forever_for_a_killed_chiefs_marker(tmp_path, caplog):
    (tmp_path / "cache.building").write_text('{"pid": 1, "beat": 7}')  # left by a chief that was killed
    cache = FakeCache(tmp_path / "cache")
    with caplog.at_level(logging.INFO, logger="trainer.data.features"):
        build_once(cache, "worker", patience_s=60, poll_s=0.05, stale_s=0.3)
    assert cache.built == 1
    assert any("has not changed" in r.getMessage() for r in caplog.records)


def test_a_worker_uses_the_cache_the_chief_publishes(tmp_path):
    import threading

    cache = FakeCache(tmp_path / "cache")
    (tmp_path / "cache.building").write_text("{}")
    threading.Timer(0.3, lambda: setattr(cache, "built", 1)).start()  # the chief publishes
    build_once(cache, "worker", patience_s=60, poll_s=0.05, stale_s=30)
    assert cache.built == 1  # published by the chief, not rebuilt here
