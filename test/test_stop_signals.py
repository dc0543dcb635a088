"""The node's stop-signal handling keeps a stop that arrives inside a callback from C.

Python drops an exception raised in a ctypes callback (numba loads its cached kernels through
llvmlite's) after printing its traceback, so a signal handled there must neither print a
traceback nor be lost. Each case runs in its own interpreter, as the node's entry point does.
"""

import subprocess
import sys

# A C library function (qsort) calls back into Python; the first call runs {first_call}.
SORT_IN_C = '''
import ctypes
INT_P = ctypes.POINTER(ctypes.c_int)
COMPARE = ctypes.CFUNCTYPE(ctypes.c_int, INT_P, INT_P)
calls = []


def compare(a, b):
    calls.append(1)
    if len(calls) == 1:
        {first_call}
    return a[0] - b[0]


def sort_in_c():
    values = (ctypes.c_int * 5)(5, 4, 3, 2, 1)
    ctypes.CDLL(None).qsort(values, 5, ctypes.sizeof(ctypes.c_int), COMPARE(compare))
'''
SCRIPT = '''
import signal, sys
from s4fusion_ros.ros.run_node import StopSignals

stop = StopSignals()
stop.install()
''' + SORT_IN_C + '''
sort_in_c()
print('went on' if len(calls) > 1 else 'stopped in C', flush=True)
try:
    stop.raise_if_received()
    print('not interrupted')
except KeyboardInterrupt:
    print('interrupted')
'''


def run(first_call: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-c', SCRIPT.format(first_call=first_call)],
                          capture_output=True, text=True, timeout=60)


def test_a_stop_signal_inside_a_c_callback_stops_after_it_without_a_traceback():
    done = run('signal.raise_signal(signal.SIGTERM)')
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ['went on', 'interrupted']
    assert done.stderr == ''


def test_other_errors_inside_a_c_callback_are_still_reported():
    done = run('raise ValueError("bad comparison")')
    assert done.stdout.splitlines() == ['went on', 'not interrupted']
    assert 'ValueError: bad comparison' in done.stderr


HALF_BUILT_TASK = '''
import gc, sys
from rclpy.task import Task
from s4fusion_ros.ros.run_node import StopSignals

stop = StopSignals()
stop.install()
stop.received = {received}
# What a KeyboardInterrupt inside Task.__init__ leaves: a Task without its Future attributes,
# whose __del__ fails when it is collected.
half_built = Task.__new__(Task)
del half_built
gc.collect()


class Other:
    def __del__(self):
        self.missing  # a real error, not the interrupt's: reported either way


other = Other()
del other
gc.collect()
print('collected', flush=True)
'''


def test_a_task_half_built_by_the_stop_interrupt_is_collected_without_a_traceback():
    # rclpy's real Task: after a stop signal its __del__ error is part of stopping; before one
    # it is still reported.
    for received, reported in ((True, False), (False, True)):
        done = subprocess.run([sys.executable, '-c', HALF_BUILT_TASK.format(received=received)],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and done.stdout == 'collected\n', done.stderr
        assert ("has no attribute '_exception'" in done.stderr) == reported, done.stderr
        assert "'Other' object has no attribute 'missing'" in done.stderr, done.stderr


# A tool module whose import is interrupted: it sends itself the signal while it loads, as a
# Ctrl-C during torch's and OpenCV's import does, then goes on loading.
SLOW_IMPORT = '''
import os, signal
os.kill(os.getpid(), signal.{signal_name})
loaded = sum(range(10 ** 5))  # still loading when Python runs the handler


def main():
    print('ran')
    return 0
'''
ENTRY = '''
import signal, sys
sys.path.insert(0, {folder!r})
if {ignored}:  # a shell starts background jobs so
    signal.signal(signal.SIGINT, signal.SIG_IGN)
sys.argv[0] = 's4fusion-tool'
from s4fusion_ros.entry_points import _command
sys.exit(_command('slow_tool')())
'''


def test_a_stop_signal_while_a_tool_loads_ends_it_without_a_traceback(tmp_path):
    for signal_name, ignored in (('SIGINT', False), ('SIGINT', True), ('SIGTERM', False)):
        (tmp_path / 'slow_tool.py').write_text(SLOW_IMPORT.format(signal_name=signal_name))
        done = subprocess.run([sys.executable, '-c', ENTRY.format(folder=str(tmp_path),
                                                                  ignored=ignored)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 130, (signal_name, ignored, done.stdout, done.stderr)
        assert done.stderr.strip() == 's4fusion-tool: interrupted'
        assert 'ran' not in done.stdout


# A tool that has done its work and returned, then gets the signal while Python shuts down
# (torch's and numba's teardown take most of a second): as a supervisor's stop that comes late.
FINISHED_TOOL = '''
import atexit, os, signal
from s4fusion_ros.cli import stop_on_signals


def stopped_late():
    os.kill(os.getpid(), signal.{signal_name})
    sum(range(10 ** 5))  # still exiting when Python runs the handler


def main():
    stop_on_signals()
    atexit.register(stopped_late)
    print('ran')
    return 0
'''


def test_a_stop_signal_after_a_tool_finished_keeps_its_exit_status(tmp_path):
    for signal_name in ('SIGINT', 'SIGTERM'):
        (tmp_path / 'slow_tool.py').write_text(FINISHED_TOOL.format(signal_name=signal_name))
        done = subprocess.run([sys.executable, '-c', ENTRY.format(folder=str(tmp_path),
                                                                  ignored=False)],
                              capture_output=True, text=True, timeout=60)
        assert (done.returncode, done.stdout, done.stderr) == (0, 'ran\n', ''), signal_name


# A tool stopped by one signal, and by a second one (timeout and ros2 launch send two) while its
# clean-up runs: the clean-up must finish, or the tool's partial outputs stay behind.
CLEANED_UP_TOOL = '''
import os, pathlib, signal, time
from s4fusion_ros.cli import run_command, stop_on_signals


def work(partial):
    partial.write_text('partial')
    try:
        os.kill(os.getpid(), signal.{first})
        time.sleep(5)
    finally:
        os.kill(os.getpid(), signal.{second})
        time.sleep(0.2)  # removing a large partial output
        partial.unlink()


def main():
    stop_on_signals()
    return run_command('s4fusion-tool', lambda: work(pathlib.Path({folder!r}) / 'partial'),
                       (), 'interrupted; the partial output was removed')
'''


def test_a_second_stop_signal_does_not_cut_a_tools_clean_up_short(tmp_path):
    for first, second in (('SIGINT', 'SIGINT'), ('SIGINT', 'SIGTERM'), ('SIGTERM', 'SIGINT')):
        (tmp_path / 'slow_tool.py').write_text(CLEANED_UP_TOOL.format(
            first=first, second=second, folder=str(tmp_path)))
        done = subprocess.run([sys.executable, '-c', ENTRY.format(folder=str(tmp_path),
                                                                  ignored=False)],
                              capture_output=True, text=True, timeout=60)
        assert (done.returncode, done.stderr.strip()) == (
            130, 's4fusion-tool: interrupted; the partial output was removed'), (first, second,
                                                                                 done.stderr)
        assert not (tmp_path / 'partial').exists(), (first, second)


# A tool whose first stop signal lands in a callback from C (numba loads its cached kernels
# through llvmlite's), where Python drops the interrupt: it goes on working, and the next signal
# must stop it, since the later ones are ignored only while a clean-up runs.
LOST_IN_C_TOOL = '''
import os, signal, threading, time
from s4fusion_ros.cli import run_command, stop_on_signals
''' + SORT_IN_C.format(first_call='signal.raise_signal(signal.SIGINT)') + '''

def work():
    sort_in_c()
    threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
    time.sleep(30)
    print('ran to the end')
    return 0


def main():
    stop_on_signals()
    return run_command('s4fusion-tool', work, (), 'interrupted')
'''


def test_a_stop_signal_lost_in_a_c_callback_leaves_the_next_one_to_stop_the_tool(tmp_path):
    (tmp_path / 'slow_tool.py').write_text(LOST_IN_C_TOOL)
    done = subprocess.run([sys.executable, '-c', ENTRY.format(folder=str(tmp_path),
                                                              ignored=False)],
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (130, ''), (done.stdout, done.stderr)
    assert [line for line in done.stderr.splitlines() if line] == [
        's4fusion-tool: a stop signal came where Python could not act on it; the next one stops',
        's4fusion-tool: interrupted'], done.stderr
