"""The stop request outlives the train loop: stop signals after the save, even during interpreter
shutdown, leave the exit code alone."""

import contextlib
import os
import signal
import subprocess
import sys
import textwrap

from flip_ds.train import EXIT_PREEMPTED


def _run(body: str) -> subprocess.CompletedProcess:
    script = textwrap.dedent("""
        import os, signal, sys
        from flip_ds.signals import StopRequest
        stop = StopRequest()
        stop.install()
    """) + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)


def test_a_sigterm_after_a_requested_stop_does_not_kill_the_exiting_process():
    done = _run(f"""
        os.kill(os.getpid(), signal.SIGUSR1)
        stop.uninstall()  # the train loop's finally, after the save
        os.kill(os.getpid(), signal.SIGTERM)  # SLURM's follow-up while the process shuts down
        sys.exit({EXIT_PREEMPTED} if stop.signum == signal.SIGUSR1 else 1)
    """)
    assert done.returncode == EXIT_PREEMPTED, done.stderr


def test_signals_until_the_end_do_not_kill_the_exiting_process():
    """SLURM's template repeats USR1 every 5 s until the step ends: one may land while Python shuts
    down, when it gives the signals it handles their default action (termination) back. Here the
    signals come as fast as they can until the process has exited."""
    script = textwrap.dedent(f"""
        import signal, sys, time
        from flip_ds.signals import StopRequest
        stop = StopRequest()
        stop.install()
        print("ready", flush=True)
        while not stop.requested:
            time.sleep(0.001)
        stop.uninstall()  # the train loop's finally, after the save
        sys.exit({EXIT_PREEMPTED})
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline() == "ready\n"
    sent = 0
    while child.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, signal.SIGUSR1)
            sent += 1
    assert child.returncode == EXIT_PREEMPTED and sent > 1


def test_without_a_request_uninstall_gives_sigterm_back_its_default():
    done = _run("""
        stop.uninstall()
        os.kill(os.getpid(), signal.SIGTERM)
        sys.exit(0)
    """)
    assert done.returncode == -15, done.stderr


def test_a_rank_stopping_for_another_ranks_signal_ignores_later_ones():
    """Ranks stop together: one that was not signalled itself must not die of a late SIGTERM either."""
    done = _run(f"""
        stop.stopping = True  # the step's agreement said another rank was signalled
        stop.uninstall()
        os.kill(os.getpid(), signal.SIGTERM)
        sys.exit({EXIT_PREEMPTED})
    """)
    assert done.returncode == EXIT_PREEMPTED, done.stderr
