"""segguided_jax.training.watchdog: a stalled run stops within its bound; a preempted one that cannot reach
its next step stops within its grace. The class alone here; through the command, with a peer
frozen mid-run, in tests/test_multiprocess.py."""
import threading
import time

from segguided_jax.training.watchdog import STALLED_EXIT_CODE, Watchdog


class Exits:
    def __init__(self):
        self.codes, self.at, self.done = [], [], threading.Event()

    def __call__(self, code):
        self.codes.append(code)
        self.at.append(time.monotonic())
        self.done.set()


def test_stall_stops_the_run_after_the_bound_and_names_the_last_progress(capsys):
    exits = Exits()
    start = time.monotonic()
    with Watchdog(stall_s=0.5, grace_s=None, preempted=lambda: False, poll_s=0.02, process_index=1, exit=exits) as w:
        w.beat("step 7")
        assert exits.done.wait(5)
    assert exits.codes == [STALLED_EXIT_CODE]
    assert 0.5 <= exits.at[0] - start < 2.0
    err = capsys.readouterr().err
    assert "process 1: no progress for" in err and "since step 7" in err and "train.stall_timeout_s=0.5" in err


def test_beats_keep_a_slow_run_alive():
    exits = Exits()
    with Watchdog(stall_s=0.3, grace_s=None, preempted=lambda: False, poll_s=0.02, exit=exits) as w:
        for step in range(15):  # 1.5 s in all, each step well inside the bound
            time.sleep(0.1)
            w.beat(f"step {step}")
    assert exits.codes == []


def test_preemption_without_progress_stops_after_the_grace(capsys):
    exits, notice = Exits(), threading.Event()
    with Watchdog(stall_s=60, grace_s=0.4, preempted=notice.is_set, poll_s=0.02, exit=exits) as w:
        w.beat("step 3")
        time.sleep(0.3)
        assert not exits.done.is_set()  # no notice yet: a quiet loop under the stall bound is fine
        noticed = time.monotonic()
        notice.set()
        assert exits.done.wait(5)
    assert 0.4 <= exits.at[0] - noticed < 1.5
    assert "preemption notice (SIGTERM)" in capsys.readouterr().err


def test_progress_after_a_preemption_notice_defers_the_stop():
    """A run that still makes progress reaches its save: the grace counts from the last beat."""
    exits, notice = Exits(), threading.Event()
    with Watchdog(stall_s=60, grace_s=0.3, preempted=notice.is_set, poll_s=0.02, exit=exits) as w:
        notice.set()
        for step in range(10):  # 1 s of steps after the notice, each inside the grace
            time.sleep(0.1)
            w.beat(f"step {step}")
    assert exits.codes == []


def test_no_bounds_no_thread():
    w = Watchdog(stall_s=None, grace_s=None, preempted=lambda: True)
    assert w._thread is None
    w.close()
