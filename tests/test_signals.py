"""The stop request outlives the train loop: a SIGTERM after the save leaves the exit code alone."""

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


def test_without_a_request_uninstall_gives_sigterm_back_its_default():
    done = _run("""
        stop.uninstall()
        os.kill(os.getpid(), signal.SIGTERM)
        sys.exit(0)
    """)
    assert done.returncode == -15, done.stderr
