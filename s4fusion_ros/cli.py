"""Command-line helpers the console tools share: arguments, exit codes, child processes (no ROS,
no torch)."""

import argparse
import contextlib
import dataclasses
import functools
import itertools
import math
import os
import pathlib
import re
import resource
import select
import signal
import subprocess
import sys
import threading


def parse_size(text: str, minimum: int = 1) -> tuple[int, int]:
    """'WxH' -> (W, H), width first as cameras name their sizes; each at least `minimum`."""
    try:
        width, height = (int(v) for v in text.lower().split('x'))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, got '{text}'") from None
    if width < minimum or height < minimum:
        raise argparse.ArgumentTypeError(f"sizes must be at least {minimum}, got '{text}'")
    return width, height


def output_path(text: str) -> pathlib.Path:
    """A path to write to; an empty one (an unset shell variable, say) is refused: pathlib reads
    it as the current folder, which the tool would fill."""
    if not text:
        raise argparse.ArgumentTypeError('an empty path: name the output')
    return pathlib.Path(text)


def file_path(text: str) -> pathlib.Path:
    """A path naming a file to write; one ending in a separator names a folder (pathlib drops
    the separator, so `--out reports/` would write a file named reports)."""
    if text.endswith(tuple(filter(None, (os.sep, os.altsep)))):
        raise argparse.ArgumentTypeError(f"'{text}' names a folder: name the file in it")
    return output_path(text)


@dataclasses.dataclass(frozen=True)
class TimeWindow:
    """The part of a bag a tool reads, as `ros2 bag play` names it: from `start_offset` seconds
    after the bag's first message (its metadata's start time) for `duration` seconds (None: to
    the bag's end). bagio.log_window places it in a bag."""

    start_offset: float = 0.0
    duration: float | None = None

    @property
    def whole(self) -> bool:
        """Whether it is every bag whole."""
        return self == TimeWindow()

    def describe(self) -> str:
        """In seconds into a bag: 'from 2 s to 3.5 s', 'from 2 s to the end'."""
        end = 'the end' if self.duration is None else f'{self.start_offset + self.duration:g} s'
        return f'from {self.start_offset:g} s to {end}'

    def options(self) -> dict:
        """{option: value}, as a manifest records the window."""
        return {'--start-offset': self.start_offset, '--playback-duration': self.duration}


def parse_seconds(text: str, positive: bool = False) -> float:
    """A finite number of seconds, at least 0 (`positive`: above 0)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise argparse.ArgumentTypeError(
            f"expected a number of seconds {'> 0' if positive else '>= 0'}, got '{text}'")
    return value


def add_window_options(parser: argparse.ArgumentParser, verb: str) -> None:
    """--start-offset and --playback-duration (ros2 bag play's names), which time_window reads;
    `verb` says what the tool does with the messages ('play', 'fuse')."""
    parser.add_argument('--start-offset', type=parse_seconds, default=0.0, metavar='SECONDS',
                        help=f"{verb} from SECONDS after the bag's first message, by the time "
                        'it recorded each message (its log time; default: %(default)s)')
    parser.add_argument('--playback-duration', metavar='SECONDS',
                        type=functools.partial(parse_seconds, positive=True),
                        help=f'{verb} SECONDS of the bag from --start-offset on (default: to '
                        'its end)')


def time_window(args: argparse.Namespace) -> TimeWindow:
    """The window of the options add_window_options added."""
    return TimeWindow(args.start_offset, args.playback_duration)


def split_ros_arguments(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the arguments outside the ROS arguments, those inside), as rcl reads a command line: ROS
    arguments run from each --ros-args to the next '--' or the end (neither marker is kept).

    rclpy.utilities.remove_ros_args would tell the same, but rclpy loads for seconds, and the
    node's stop-signal handlers must be in place before it does."""
    own, ros, in_ros_arguments = [], [], False
    for argument in argv:
        if argument == '--ros-args':
            in_ros_arguments = True
        elif argument == '--' and in_ros_arguments:
            in_ros_arguments = False
        else:
            (ros if in_ros_arguments else own).append(argument)
    return own, ros


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # what Ctrl-C, kill and supervisors send
# run_command's exit status where stdout's reader left: SIGPIPE's, as a shell reports it.
READER_LEFT = 128 + signal.SIGPIPE


def stop_on_signals() -> None:
    """Make the first SIGINT or SIGTERM raise KeyboardInterrupt, so a tool cleans up as for
    Ctrl-C, and the later ones ignored while it does.

    `kill` and service managers send SIGTERM; a shell starts background jobs with SIGINT ignored
    and children inherit that, so a supervisor's SIGINT (`interrupt`) would go unheard. A
    second signal (timeout and ros2 launch send one; an impatient Ctrl-C) raised inside the
    clean-up cut it short: s4fusion-bag left its partial bag behind, saying it was removed.
    """
    for stop_signal in STOP_SIGNALS:
        signal.signal(stop_signal, _interrupt_once)
    sys.unraisablehook = _interrupt_lost


def _interrupt_once(_signum, _frame) -> None:
    """stop_on_signals' handler."""
    ignore_stop_signals()
    raise KeyboardInterrupt


def _interrupt_lost(unraisable) -> None:
    """stop_on_signals' hook for the exceptions Python drops ('Exception ignored in'): an
    interrupt raised in a callback from C (numba loads its cached kernels through llvmlite's) or
    a finalizer stopped nothing, and the tool goes on, so the next stop signal must stop it."""
    if not (issubclass(unraisable.exc_type, KeyboardInterrupt) and on_main_thread()):
        sys.__unraisablehook__(unraisable)
        return
    print(f'{os.path.basename(sys.argv[0])}: a stop signal came where Python could not act on '
          'it; the next one stops', file=sys.stderr, flush=True)
    stop_on_signals()


def ignore_stop_signals() -> None:
    """Ignore the stop signals while a tool stops: a second Ctrl-C (timeout and ros2 launch
    send one) must not cut its clean-up short or end it in a traceback."""
    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)


@contextlib.contextmanager
def stop_signals_handled(handler):
    """Handle the stop signals with `handler` (signal.SIG_IGN, say) inside the block; the
    handlers they had come back after it. Off the main thread, whose handlers these are,
    nothing changes (Python runs them there only, and sets them there only)."""
    with contextlib.ExitStack() as handlers:
        if on_main_thread():
            for number in STOP_SIGNALS:
                handlers.callback(signal.signal, number, signal.signal(number, handler))
        yield


def on_main_thread() -> bool:
    """Whether this is the main thread: the one whose signal handlers Python runs and sets."""
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def interrupts_held(notice: str = ''):
    """Hold the stop signals that raise KeyboardInterrupt (Ctrl-C) until the block ends, and
    raise one there: for a short block that an interrupt would cut short where nothing can clean
    up after it, or lose (Python only reports an exception raised in an at-fork hook or a
    finalizer: 'Exception ignored in'). The first one held prints `notice`, so that the wait is
    not taken for a hang. Other handlers are the caller's."""
    held = []

    def hold(signum, _frame):
        if notice and not held:
            print(notice, file=sys.stderr, flush=True)
        held.append(signum)

    with contextlib.ExitStack() as handlers:
        if on_main_thread():  # as stop_signals_handled
            for number in STOP_SIGNALS:
                if signal.getsignal(number) in (signal.default_int_handler, _interrupt_once):
                    handlers.callback(signal.signal, number, signal.signal(number, hold))
        yield
    if held:
        if any(signal.getsignal(number) is _interrupt_once for number in STOP_SIGNALS):
            ignore_stop_signals()  # as _interrupt_once: the clean-up is not cut short
        raise KeyboardInterrupt


# How close to its address space limit a process must have come for an error to be put down to
# it: a large image's buffers, or the 100-200 MB numba's LLVM maps when it loads, did not fit.
NEAR_ADDRESS_SPACE_LIMIT = 512 << 20


def address_space_note() -> str:
    """A note for an error line where this process came near its address space limit (ulimit -v,
    a systemd service's LimitAS=), else ''. Failed allocations under it rarely say so: numba's
    LLVM not loading reads as a library missing or unreadable, a thread not starting as a
    resource temporarily unavailable."""
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    if limit == resource.RLIM_INFINITY:
        return ''
    try:
        with open('/proc/self/status') as status:
            peak = 1024 * int(next(line for line in status
                                   if line.startswith('VmPeak:')).split()[1])
    except (OSError, StopIteration):  # no procfs: the limit alone cannot tell
        return ''
    if peak < limit - NEAR_ADDRESS_SPACE_LIMIT:
        return ''
    return (f' (this process reached its address space limit of {limit / 2**30:.2f} GiB, '
            f'ulimit -v: an allocation failed, whatever the error says; allow more)')


# Terminal escapes in a library's message (torch's weights-only refusal sets text in bold).
_TERMINAL_ESCAPE = re.compile(r'\x1b\[[0-9;]*[A-Za-z]')
# Where torch.load(weights_only=True) says what it refused, after its advice to load unsafely.
_WEIGHTS_ONLY_FAULT = re.compile(r'^\s*WeightsUnpickler error: (.+)$', re.MULTILINE)
# The advice torch appends to each fault of a zip file it reads (a .pt, a .pt2): a torn one's, or
# another kind of file's, is no internal error.
_TORCH_ZIP_ADVICE = re.compile(r'\. This is an internal miniz error\..*', re.DOTALL)


def one_line_reason(error: BaseException) -> str:
    """What a library's exception says is wrong, on one line, for an error line that names the
    file or topic itself: libraries' texts span lines (torch's load_state_dict heads its list of
    faults 'Error(s) in loading state_dict for X:'; its weights-only refusal gives advice in
    lines before the fault, and advice follows its faults in zip files), OpenCV names its source
    file and ends in a line break, a MemoryError may say nothing."""
    if type(error).__module__ == 'cv2' and isinstance(getattr(error, 'err', None), str):
        return error.err  # cv2.error: its fault without 'OpenCV(5.0.0) /io/...: error: (-4:'
    text = _TORCH_ZIP_ADVICE.sub('', _TERMINAL_ESCAPE.sub('', str(error)))
    fault = _WEIGHTS_ONLY_FAULT.search(text)
    if fault:  # its first sentence; the next ones tell a developer how to allow the type
        return fault[1].split('. ')[0].rstrip('.')
    lines = [line.rstrip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    # A heading with its items below, each after a tab (torch's state dict faults); not a
    # traceback's lines, which are indented with spaces.
    items = list(itertools.takewhile(lambda line: line.startswith('\t'), lines[1:]))
    if lines[0].endswith(':') and items:
        return f'{lines[0].strip()} ' + '; '.join(item.strip().rstrip('.') for item in items)
    return lines[0].strip()


def run_command(prog: str, command, errors: tuple, interrupted='interrupted',
                describe=str) -> int:
    """Return command()'s exit code; one of `errors` prints one line, describe(error), and
    gives 1; Ctrl-C (or SIGTERM after stop_on_signals) gives 130 and the line `interrupted`: a
    str, or a callable of the KeyboardInterrupt (for what was left at that moment). A reader of
    stdout or stderr that left (`| head`; `|& tee log`, whose tee a Ctrl-C ended first) gives
    141, without a word, as SIGPIPE ends other Unix tools; the codes above stand where only
    their line found no reader."""
    try:
        try:
            code = command()
            # Written here, not at exit: a pipe holds stdout back (block-buffered), and Python
            # reports a reader that left during its exit's flush and exits 120.
            sys.stdout.flush()
            return code
        except BrokenPipeError as error:
            left = [stream for stream in (sys.stdout, sys.stderr) if reader_left(stream)]
            if not left:  # another pipe, a child's say: an error as any
                raise
            interrupt = _interrupt_behind(error)
            if interrupt is not None:  # the clean-up after a Ctrl-C found no reader
                raise interrupt from None
    except errors as error:
        print(f'{prog}: {describe(error)}{address_space_note()}',
              file=WritesThatCannotFail(sys.stderr))
        return 1
    except (KeyboardInterrupt, SystemError) as error:
        # Ctrl-C inside a C-to-Python callback (numba unpickling its cached kernels) comes
        # out as a SystemError caused by the KeyboardInterrupt.
        interrupt = _interrupt_behind(error)
        if interrupt is None:
            raise
        text = interrupted(interrupt) if callable(interrupted) else interrupted
        print(f'\n{prog}: {text}', file=WritesThatCannotFail(sys.stderr))
        return 130
    for stream in left:
        write_nowhere(stream)
    return READER_LEFT


def write_nowhere(stream) -> None:
    """Send what is still written to `stream`, whose reader left, to /dev/null: Python would
    fail to flush it again at exit and say so."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, stream.fileno())
    os.close(devnull)


class WritesThatCannotFail:
    """A text stream (stderr) to stand for `stream` while a tool finishes work it must not cut
    short: once its reader has left (`|& tee log`, whose tee the same Ctrl-C ended; a closed
    terminal), a write that fails sends it and what follows to /dev/null and sets `reader_left`,
    instead of raising wherever the tool was (in a progress bar's refresh, in mid-step)."""

    def __init__(self, stream):
        self.stream = stream
        self.reader_left = False

    def _forgiving(self, method, *args):
        try:
            return getattr(self.stream, method)(*args)
        except OSError:  # EPIPE from a pipe, EIO from a terminal hung up
            self.reader_left = True
            write_nowhere(self.stream)
            return len(args[0]) if args else None

    def write(self, text: str) -> int:
        return self._forgiving('write', text)

    def flush(self) -> None:
        self._forgiving('flush')

    def __getattr__(self, name):  # fileno, isatty, encoding: the stream's
        return getattr(self.stream, name)


def reader_left(stream) -> bool:
    """Whether `stream` is a pipe whose reader has closed it (poll reports an error on it)."""
    try:
        fileno = stream.fileno()
    except (AttributeError, OSError, ValueError):  # replaced by an object without a file
        return False
    poll = select.poll()
    poll.register(fileno, 0)
    return any(events & select.POLLERR for _, events in poll.poll(0))


def _interrupt_behind(error: BaseException) -> KeyboardInterrupt | None:
    while error is not None:
        if isinstance(error, KeyboardInterrupt):
            return error
        error = error.__cause__ or error.__context__
    return None


# Runs in the child before its command: the parent-death signal (prctl PR_SET_PDEATHSIG, 1)
# survives execve, so the command gets SIGTERM when the tool that started it dies, even by
# SIGKILL, which runs no clean-up. Set in a launcher, not in Popen's preexec_fn: that is unsafe
# once the tool has threads (rclpy's DDS threads), and the child could deadlock before exec.
# The launcher starts with SIGINT blocked and takes a Ctrl-C only once its handler is the
# default, so a Ctrl-C before the exec ends it quietly instead of with a Python traceback. The
# signals Python ignores (SIGPIPE, SIGXFSZ) are restored, as Popen restores them: an ignored
# signal stays ignored across the exec.
_STOP_WITH_PARENT = """
import _signal
for number in (_signal.SIGINT, _signal.SIGPIPE, _signal.SIGXFSZ):
    _signal.signal(number, _signal.SIG_DFL)
_signal.pthread_sigmask(_signal.SIG_UNBLOCK, [_signal.SIGINT])
import ctypes, os, sys
ctypes.CDLL(None, use_errno=True).prctl(1, _signal.SIGTERM)
if os.getppid() != int(sys.argv[1]):  # the tool died before prctl
    sys.exit(1)
os.execvp(sys.argv[2], sys.argv[2:])
"""


def start_child(command: list[str], log_path: pathlib.Path) -> subprocess.Popen:
    """Start `command` with its output in `log_path`, stopped (SIGTERM) if this process dies.

    Without it a tool killed by SIGKILL leaves its node running and publishing, an orphan.
    Call it from the main thread: Linux sends the signal when the starting thread ends.
    """
    if not sys.platform.startswith('linux'):
        with open(log_path, 'wb') as log:
            return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    # -I -S: neither the current folder, PYTHON* variables nor site packages reach it.
    command = [sys.executable, '-I', '-S', '-c', _STOP_WITH_PARENT, str(os.getpid()), *command]
    # The child inherits this thread's signal mask; this thread's own Ctrl-C waits the moment.
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGINT])
    try:
        with open(log_path, 'wb') as log:
            return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def interrupt(process: subprocess.Popen, timeout: float = 10.0) -> int:
    """Ctrl-C a child process (SIGINT, as ros2 launch stops nodes), kill it after `timeout`
    seconds; return its exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait()
