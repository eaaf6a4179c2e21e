"""Ctrl-C / SIGTERM end a command with one line and exit 130 / 143 (scripts.interrupts); bad input, interrupts
and a full disk reach the command's one line without a traceback logged by MONAI's StatsHandler (OneLineErrors).
The command-line test with a real extraction is in tests/test_cohort_scale.py."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time

import pytest
import yaml
from ignite.engine import Engine, Events

from conftest import ROOT
from scripts.errors import BundleInputError

PROGRAM = """
import sys, time
from scripts.errors import install_excepthook
install_excepthook(signals=True)
try:
    print("ready", flush=True)
    time.sleep(60)
finally:
    print("cleaned up", flush=True)
"""


def _interrupt(sig: int, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.Popen([sys.executable, "-c", PROGRAM, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_ends_the_command_with_one_line_and_the_shell_code(sig, code):
    r = _interrupt(sig)
    assert r.returncode == code
    assert r.stderr.strip().splitlines() == [f"interrupted ({signal.Signals(sig).name}): rerun the same command to resume"]
    assert r.stdout.strip() == "cleaned up"  # finally blocks (temporary files) still run


def test_debug_keeps_where_it_was_interrupted():
    r = _interrupt(signal.SIGINT, "--debug")
    assert r.returncode == 130 and 'File "<string>", line' in r.stderr and r.stderr.strip().endswith("rerun the same command to resume")


def test_importing_the_bundle_elsewhere_keeps_python_s_ctrl_c():
    from scripts.errors import install_excepthook

    before = signal.getsignal(signal.SIGINT)
    install_excepthook()  # this process is pytest, not `python -m monai.bundle`
    assert signal.getsignal(signal.SIGINT) is before


def _engine_raising(exc: BaseException, ignite_said: list[str] | None = None) -> tuple[BaseException, list[logging.LogRecord]]:
    """Run an engine whose step raises ``exc``: what it raised and the records logged with a traceback;
    ``ignite_said`` receives the messages of the engine's own logger (ignite's "terminating due to exception")."""
    from monai.handlers import StatsHandler

    from scripts.workflows.handlers import OneLineErrors

    engine = Engine(lambda e, b: (_ for _ in ()).throw(exc))
    OneLineErrors().attach(engine)
    stats = StatsHandler(iteration_log=False, epoch_log=False)
    stats.attach(engine)
    records: list[logging.LogRecord] = []
    catcher = logging.Handler()
    catcher.emit = records.append  # StatsHandler's logger does not propagate to caplog
    own = logging.Handler()
    own.emit = lambda r: ignite_said.append(r.getMessage()) if ignite_said is not None else None
    stats.logger.addHandler(catcher)
    engine.logger.addHandler(own)
    try:
        with pytest.raises(BaseException) as raised:
            engine.run([0], max_epochs=1)
    finally:
        stats.logger.removeHandler(catcher)
        engine.logger.removeHandler(own)
    return raised.value, [r for r in records if r.exc_info]


@pytest.mark.parametrize("exc", [BundleInputError("x.csv", "bad", "fix it"), SystemExit(130), KeyboardInterrupt()])
def test_bad_input_and_interrupts_are_not_logged_with_a_traceback(exc):
    said: list[str] = []
    raised, logged = _engine_raising(exc, said)
    assert raised is exc and logged == []
    assert not [m for m in said if "terminating due to exception" in m]  # not ignite's "... due to exception: 130" either


def test_other_errors_keep_their_logged_traceback(monkeypatch):
    said: list[str] = []
    raised, logged = _engine_raising(ValueError("a bug"), said)
    assert isinstance(raised, ValueError) and len(logged) >= 1
    assert "Engine run is terminating due to exception: a bug" in said
    monkeypatch.setattr(sys, "argv", [*sys.argv, "--debug"])
    exc = BundleInputError("x.csv", "bad", "fix it")
    raised, logged = _engine_raising(exc)
    assert raised is exc and len(logged) >= 1  # --debug: the traceback is logged as before


def test_training_config_puts_one_line_errors_and_the_loss_guard_first():
    cfg = yaml.safe_load((ROOT / "configs" / "train.yaml").read_text())
    assert cfg["train"]["every_rank"] == ("$[@train#errors, @train#loss_guard] + ([@train#schedule] if @lr_schedule is not None else [])"
                                          " + [@train#validation]")  # a recipe's schedule steps before validation
    assert cfg["train"]["errors"]["_target_"] == "scripts.workflows.handlers.OneLineErrors"
    assert cfg["train"]["loss_guard"] == {"_target_": "scripts.workflows.handlers.LossGuard", "learning_rate": "@learning_rate",
                                          "num_classes": "@num_outputs", "recipe": "@recipe"}  # chance loss: ln K; the rate's source
    assert cfg["validate"]["handlers"][0] == "@validate#errors"
    assert cfg["validate"]["checkpoint"]["_target_"] == "scripts.workflows.handlers.AtomicCheckpointSaver"


def test_the_loss_guard_stops_a_diverging_run_but_not_a_learning_one():
    from scripts.workflows.handlers import LossGuard

    def run(losses):
        it = iter(losses)
        engine = Engine(lambda e, b: {"loss": next(it)})
        LossGuard(learning_rate=0.1).attach(engine)
        engine.run([0, 1], max_epochs=len(losses) // 2)
        return engine.state.epoch

    assert run([0.7, 0.69, 2.5, 30.0, 0.4, 0.3]) == 3  # a bad epoch (mean 16) is no divergence
    with pytest.raises(BundleInputError, match=r"training epoch 2: mean train loss 80 .*--learning_rate \(now 0.1\)"):
        run([0.7, 0.69, 60.0, 100.0, 0.4, 0.3])
    with pytest.raises(BundleInputError, match=r"iteration 3.*loss is inf"):
        run([0.7, 0.69, float("inf"), 0.5])


WATCHED = """
import sys, threading, time
from scripts.interrupts import StopRequested, check_stop, install_interrupt_handlers, stop_signal, watch_for_stop
poll = sys.argv[1] == "poll"
done = threading.Event()
def work():  # the work on another thread, the main thread handed over (the Deploy app's Holoscan graph)
    try:
        print("ready", flush=True)
        while True:
            if poll:
                check_stop()
            time.sleep(0.02)
    except StopRequested as stop:
        print("stopped", stop.signum, flush=True)
    finally:
        done.set()
install_interrupt_handlers()
with watch_for_stop() as watching:
    threading.Thread(target=work, daemon=True).start()
    done.wait()
print("watching", watching, "signal", stop_signal(), flush=True)
"""


def _watched(poll: bool, *signals: int) -> subprocess.CompletedProcess:
    proc = subprocess.Popen([sys.executable, "-c", WATCHED, "poll" if poll else "ignore"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    for sig in signals:
        proc.send_signal(sig)
        time.sleep(0.3)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_a_signal_reaches_work_off_the_main_thread_at_its_next_check():
    r = _watched(True, signal.SIGTERM)
    assert r.returncode == 0, r.stderr  # the caller decides how to end (the Deploy app: one line, exit 143)
    assert r.stdout.split("\n")[:2] == [f"stopped {int(signal.SIGTERM)}", f"watching True signal {int(signal.SIGTERM)}"]
    assert "SIGTERM received: stopping after the current step" in r.stderr


def test_a_second_signal_ends_work_that_does_not_check_at_once():
    r = _watched(False, signal.SIGINT, signal.SIGINT)
    assert r.returncode == 130
    assert r.stderr.strip().splitlines()[-1] == "interrupted again (SIGINT): stopping now" and "stopped" not in r.stdout
