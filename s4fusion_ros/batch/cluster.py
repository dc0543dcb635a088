"""Running the units of s4fusion-batch on Ray Core: tasks on CPUs, one actor per GPU.

Ray is imported only here and only when a run starts, so the package works without the [ray]
extra. A local run starts a private Ray on loopback (127.0.0.2, never the machine's interface
address, and never an instance found through RAY_ADDRESS); an address joins an existing cluster,
whose nodes must see the input and output paths (a shared file system).

Retries are Ray's: a task or actor call lost with its worker or node is run again elsewhere, up
to `max_retries` times. Errors of the bag itself come back as results and are not retried.
"""

import contextlib
import dataclasses
import ipaddress
import json
import logging
import math
import os
import pathlib
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time

from tqdm import tqdm

from .. import settings
from ..bagio import BagError
from ..cli import TimeWindow, interrupts_held, on_main_thread, stop_signals_handled
from ..entry_points import omp_wait_policy, opencv_settings
from ..files import check_writable_folder, held_folder, write_text_atomically
from ..runtime import set_threads
from . import work
from .progress import Progress
from .work import MANIFEST, BagJob, BatchError, Unit

LOCAL = 'local'
LOCAL_NODE_IP = '127.0.0.2'  # loopback, but not 127.0.0.1, which Ray replaces
FINISHED = ('done', 'skipped')  # manifest statuses of a bag whose output is complete
BOOTSTRAP_CONFIG = 'ray_bootstrap_config.yaml'
# In the private HOME, Ray's temporary folder (sessions, logs, sockets): Ray makes it writable
# by everyone, so it cannot be the HOME itself, which holds the token and stays the user's alone.
# One letter: Ray's socket paths under it may be 107 bytes at most.
RAY_TEMP = 'r'
# Ray 2.60 puts its sockets at TEMP/session_<date>_<time>_<microseconds>_<pid>/sockets/
# plasma_store (a pid up to 4194304) and refuses any past AF_UNIX's 107 bytes: the longest
# private HOME that leaves them room.
HOME_PREFIX = 's4fusion-ray-'
LONGEST_HOME = 107 - len(f'/{RAY_TEMP}/session_2026-12-07_19-52-55_462947_4194304/sockets/'
                         'plasma_store')
AUTH_MODE = 'RAY_AUTH_MODE'  # Ray's switch for token authentication
PROGRESS_PERIOD = 0.5  # seconds between a task's progress messages
# The manifest is rewritten whole at most this often as bags end (2000 bags rewritten after each
# took two minutes of the driver's time); the run's end writes it whatever the period.
MANIFEST_PERIOD = 2.0


@dataclasses.dataclass
class BagReport:
    """What happened to one bag (a row of the manifest)."""

    input: str
    output: str
    status: str = 'pending'  # done, skipped (finished earlier), failed
    pairs: int = 0
    fused: int = 0
    unpaired: int = 0
    dropped: int = 0
    failed: int = 0  # pairs whose inference raised (dropped, as the node drops them)
    seconds: float = 0.0
    error: str = ''
    units: int = 1
    nodes: list = dataclasses.field(default_factory=list)  # node IPs that finished its units
    topics: list = dataclasses.field(default_factory=list)  # the thermal and visible topic fused
    input_files: list = dataclasses.field(default_factory=list)  # work.input_identity, as planned
    # What its parts warned of (a recording cut off, a half-size camera), each once, in order.
    warnings: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Report:
    """A run: one BagReport per bag, the manifest written, the seconds taken."""

    bags: list[BagReport]
    manifest: pathlib.Path
    seconds: float = 0.0
    interrupted: bool = False

    @property
    def ok(self) -> bool:
        """Every bag fused now or before, nothing interrupted."""
        return not self.interrupted and all(b.status in FINISHED for b in self.bags)

    @property
    def fused(self) -> int:
        """Pairs fused by this run."""
        return sum(b.fused for b in self.bags if b.status == 'done')


def _ray():
    try:
        import ray
    except ImportError:
        raise BatchError('s4fusion-batch needs Ray: pip install ray==2.60.0 (the version '
                         "requirements.txt pins; or the package's [ray] extra)") from None
    return ray


def private_home() -> pathlib.Path:
    """A HOME for the processes of a private Ray: its token, its session folder (logs, sockets;
    else left in the temporary folder's ray/ after each run), and no cloud metadata requests.

    Ray 2.60 always starts a dashboard process whose usage-stats module asks the cloud metadata
    servers (169.254.169.254, metadata.google.internal) where it runs, usage stats off or not,
    unless ~/ray_bootstrap_config.yaml (a cluster launcher's config) exists: an empty one here
    keeps a private Ray on loopback.
    """
    folder = tempfile.gettempdir()
    # mkdtemp adds 8 characters. A TMPDIR past 19 bytes (a cluster job's scratch folder) leaves
    # Ray's sockets no room: the HOME goes where Ray's own temporary folder would, /tmp.
    if len(os.fsencode(os.path.join(folder, HOME_PREFIX))) + 8 > LONGEST_HOME:
        folder = '/tmp'
    home = pathlib.Path(tempfile.mkdtemp(prefix=HOME_PREFIX, dir=folder))
    (home / BOOTSTRAP_CONFIG).write_text('{}\n')
    return home


@contextlib.contextmanager
def environment(**values: str):
    """These environment variables set for the block, each back to what it was (or unset) after.

    Ray's processes keep the environment they start with (HOME: see private_home).
    """
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def token_authentication(home: pathlib.Path):
    """Ray's token authentication, with a new token in the private `home`, for a private Ray
    started in the block; the caller's RAY_AUTH_MODE back after it.

    A private Ray's servers listen on every interface, so its token is what keeps others out.
    Ray turns authentication on by itself only for ray.init's own local cluster, where
    RAY_AUTH_MODE is unset: not for the nodes of ray.cluster_utils (s4fusion-bench batch), nor
    under an inherited RAY_AUTH_MODE=disabled, Ray's own advice for opting out.
    """
    from ray._raylet import AuthenticationTokenLoader, Config

    token = home / '.ray' / 'auth_token'  # where Ray looks for it: ~/.ray/auth_token
    if not token.exists():
        token.parent.mkdir(mode=0o700, exist_ok=True)
        token.write_text(secrets.token_hex(32))  # 256 bits, as Ray makes its own
    with environment(**{AUTH_MODE: 'token'}):
        # Ray (2.60) reads its settings and its token once per process: again, for this Ray.
        Config.initialize('')
        AuthenticationTokenLoader.instance().reset_cache()
        yield


@contextlib.contextmanager
def connected(address: str = LOCAL, num_cpus: int | None = None):
    """Ray for the block: this process's connection if it has one, else a new one, closed after.

    `local` starts a private instance on loopback with `num_cpus` CPUs (default:
    local_cpus()).
    """
    ray = _ray()
    if ray.is_initialized():
        yield ray
        return
    os.environ.setdefault('RAY_USAGE_STATS_ENABLED', '0')
    common = dict(include_dashboard=False, configure_logging=True, logging_level='warning',
                  log_to_driver=True)
    home = None
    # While Ray runs, a stop signal whose action was the default (SIGTERM's kills at once) raises
    # KeyboardInterrupt, so the clean-up below runs; the caller's handlers come back at the end.
    handlers = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}

    def take_stop_signals(restore: bool) -> None:
        if on_main_thread():  # handlers settable
            for number, handler in handlers.items():
                signal.signal(number, handler if restore or handler != signal.SIG_DFL
                              else signal.default_int_handler)

    take_stop_signals(restore=False)
    authentication = contextlib.ExitStack()  # left last, once the private Ray has stopped
    try:
        try:
            if address == LOCAL:
                home = private_home()
                authentication.enter_context(token_authentication(home))
                with environment(HOME=str(home)), _starting(ray), _token_notice_quiet():
                    ray.init(address='local', num_cpus=num_cpus or local_cpus(ray),
                             _node_ip_address=LOCAL_NODE_IP,
                             _temp_dir=str(home / RAY_TEMP), **common)
            else:
                _check_reachable(address)
                # Workers on other machines do not inherit this process's set-up
                # (entry_points): give them the OpenMP wait policy and OpenCV's settings before
                # they load torch and OpenCV.
                with _starting(ray):
                    ray.init(address=address, runtime_env={'env_vars': {
                        'OMP_WAIT_POLICY': omp_wait_policy(), **opencv_settings()}},
                        **_driver_address(address), **common)
        except (ValueError, ConnectionError) as error:  # a malformed address, or nobody there
            if 'InvalidAuthToken' in str(error.__cause__):  # Ray's reason, in its cause alone
                token = '~/.ray/auth_token or RAY_AUTH_TOKEN'
                raise BatchError(f'--ray {address}: cannot join that Ray cluster: ' + (
                    f'it refused the token ({token}); use the cluster\'s'
                    if os.environ.get(AUTH_MODE) == 'token' else
                    f'it asks for its token; run with RAY_AUTH_MODE=token (Ray sends the token, '
                    f'from {token}, to an address given only then)')) from None
            raise BatchError(f'--ray {address}: cannot join that Ray cluster ({error})') from None
        yield ray
    finally:  # stopped or failed while starting too: nothing it started may outlive this process
        try:
            # A stop signal now asks for what is under way. Cut short, ray.shutdown leaves its
            # exit hook to shut Ray down again, writing into the removed HOME or crashing.
            with stop_signals_handled(signal.SIG_IGN):
                stop_ray(ray, home)
        finally:
            take_stop_signals(restore=True)
            authentication.close()


def local_cpus(ray) -> int:
    """The CPUs a private Ray may use: those this process may run on, within a container's CPU
    quota. Ray counts the machine's (and the quota): under `taskset`, a cpuset of cgroup v2 or
    systemd's CPUAffinity it started a task per CPU of the machine, each with its model and
    buffers, on the few CPUs the process is allowed."""
    allowed = len(os.sched_getaffinity(0))
    quota = ray._private.utils.get_num_cpus(override_docker_cpu_warning=True)
    return max(1, min(allowed, quota))  # a quota under one CPU still runs one task


@contextlib.contextmanager
def _starting(ray):
    """ray.init in the block, safe from a stop signal: one that lands is raised as
    KeyboardInterrupt once ray.init has returned (interrupts_held).

    Cut short, ray.init (2.60) goes wrong: an interrupt while it forks its processes is lost in
    an at-fork hook, and the run goes on; one while its core worker connects leaves that worker
    running, to crash the interpreter's exit (SIGSEGV). So ray.init is also kept from putting its
    own SIGTERM handler (sys.exit, which would cut it short the same way) in place first."""
    utils = ray._private.utils
    set_sigterm_handler = utils.set_sigterm_handler
    utils.set_sigterm_handler = lambda handler: None
    try:
        with interrupts_held('\nRay is starting: stopping once it has started'):
            yield
    finally:
        utils.set_sigterm_handler = set_sigterm_handler


@contextlib.contextmanager
def _token_notice_quiet():
    """Ray (2.60) warns on each start of a local cluster that it turned token authentication on,
    and how to turn it off: no news for a private Ray, whose token lives and goes with its HOME."""
    notice = logging.getLogger('ray._private.authentication.authentication_token_setup')
    level = notice.level
    notice.setLevel(logging.ERROR)
    try:
        yield
    finally:
        notice.setLevel(level)


def _check_reachable(address: str) -> None:
    """BatchError where nothing answers at a HOST:PORT cluster address: Ray would retry its
    connection for minutes without a word. Other forms ('auto', ray://) are Ray's to tell."""
    host, _, port = address.rpartition(':')
    if '://' in address or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip('[]'), int(port)), timeout=10).close()
    except OSError as error:
        raise BatchError(f'--ray {address}: nothing answers there ({error.strerror or error}); '
                         'is the cluster started (ray start --head)?') from None


def _driver_address(address: str) -> dict:
    """ray.init's node address for this process when joining the cluster at `address`: for a
    cluster on loopback, loopback too (else Ray would give its interface address, and the
    traffic would leave loopback); elsewhere Ray's choice, the address the cluster reaches.

    Ray replaces 127.0.0.1 and localhost by the interface address in the cluster's address
    itself: such a cluster is refused, naming the way that stays on loopback."""
    host = address.rsplit(':', 1)[0].strip('[]')
    if host.lower() in ('localhost', '127.0.0.1'):
        raise BatchError(f'--ray {address}: Ray would join it on this machine\'s network '
                         f'address, not on loopback; start the cluster on another loopback '
                         f'address (ray start --head --node-ip-address {LOCAL_NODE_IP}) and '
                         f'pass --ray {LOCAL_NODE_IP}:PORT')
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        loopback = False
    return {'_node_ip_address': host} if loopback else {}


def stop_ray(ray, home: pathlib.Path | None) -> None:
    """Disconnect, and for a private Ray (`home`) stop its processes and remove its HOME.

    ray.shutdown stops the processes this process started, but one that Ray's raylet started
    can outlive it when the start was cut short (its dashboard agent); they all keep the
    private HOME, which identifies them (Linux: /proc/PID/environ).
    """
    try:
        ray.shutdown()
    finally:
        if home is not None:
            for pid in processes_with_home(home):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            shutil.rmtree(home, ignore_errors=True)


def processes_with_home(home: pathlib.Path) -> list[int]:
    """The processes started with HOME=`home` (those of a private Ray), from /proc."""
    marker, found = f'HOME={home}'.encode(), []
    for environ in pathlib.Path('/proc').glob('[0-9]*/environ'):
        with contextlib.suppress(OSError):  # gone meanwhile, or not ours to read
            if marker in environ.read_bytes().split(b'\0'):
                found.append(int(environ.parent.name))
    return found


def fuse_bags(inputs, out_dir, address: str = LOCAL, num_cpus: int | None = None,
              cpus_per_task: int = 1, gpus_per_worker: float = 0.0,
              segment_minutes: float = 10.0, params=None, device: str | None = None,
              resume: bool = False, overwrite: bool = False, max_retries: int = 3,
              progress: bool = True, on_unit=None, on_progress=None,
              topics: tuple = (None, None), transport: str = 'raw',
              window: TimeWindow = TimeWindow()) -> Report:
    """Fuse every bag of `inputs` (bags or folders of bags) into `out_dir`; return the Report.

    Each output is what `s4fusion-bag IN OUT --params PARAMS` writes, stamps and pixels. Bags
    longer than `segment_minutes` are fused in segments (0: never). `gpus_per_worker` > 0 runs
    one actor per that share of a GPU, keeping its model loaded; otherwise each unit is a task
    of `cpus_per_task` CPUs. Raises BatchError or SettingsError before any work when the run
    cannot start; KeyboardInterrupt stops the cluster's work and leaves no partial bag under a
    final name (the manifest says what finished). `on_unit(result)` sees each unit's result and
    `on_progress(label, node ip, pairs)` each progress message of a task. `topics`: the
    (thermal, visible) topic of every bag, None to detect it per bag. `transport`: how the
    outputs are written (s4fusion-bag --transport), and `window`: the part of every bag fused
    (s4fusion-bag --start-offset, --playback-duration; a bag it lies past the end of fails),
    both recorded in the manifest with the parameters. A --resume that keeps every bag returns
    without starting or joining Ray.
    """
    if resume and overwrite:
        raise BatchError('--resume and --overwrite exclude each other')
    started = time.monotonic()
    # Absolute, so that the manifest's rows match whatever working directory a later run has.
    out_dir = pathlib.Path(os.path.abspath(out_dir))
    values = settings.load_offline_params(params)
    if device:
        values['device'] = device
    jobs = work.find_bags(list(map(pathlib.Path, inputs)), out_dir)
    with _sole_run_into(out_dir):
        _check_existing(jobs, resume, overwrite)
        previous = _previous_reports(out_dir / MANIFEST, values, transport, jobs, resume,
                                     overwrite, window)
        runner = _Runner(jobs, values, cpus_per_task, gpus_per_worker, segment_minutes, resume,
                         max_retries, progress, (on_unit, on_progress), previous,
                         out_dir / MANIFEST, topics, transport, window)
        if runner.keep_all_if_finished():  # planned before Ray: seconds to start it for nothing
            report = Report(runner.reports, out_dir / MANIFEST, time.monotonic() - started)
            runner.write_manifest(interrupted=False, seconds=report.seconds)
            return report
        with connected(address, num_cpus) as ray:
            runner.ray = ray
            runner.check_resources()  # before any manifest: a refused run leaves no trace
            interrupted, ended = False, {}
            try:
                runner.run()
            except KeyboardInterrupt:
                interrupted = True
                runner.stop()
                raise
            except Exception as error:  # recorded as what ended the run, not as a clean end
                ended = {'error': f'{type(error).__name__}: {error}'}
                raise
            finally:
                report = Report(runner.reports, out_dir / MANIFEST, time.monotonic() - started,
                                interrupted)
                runner.write_manifest(interrupted=interrupted, seconds=report.seconds, **ended)
    return report


@contextlib.contextmanager
def _sole_run_into(out_dir: pathlib.Path):
    """Hold `out_dir` (made if missing) for one run: a second run into it would rewrite this
    one's manifest rows (files.held_folder)."""
    try:
        check_writable_folder(out_dir)
    except OSError as error:
        raise BatchError(str(error)) from None
    with held_folder(out_dir, BatchError(f'{out_dir}: another s4fusion-batch run is writing '
                                         'into this folder; run one at a time per output '
                                         'folder')):
        yield


def _changed_since(earlier: dict, topics: tuple, input_files: list) -> str:
    """Why a bag the manifest lists as finished (row `earlier`) is to be fused again ('' when it
    is not): this run names other topics, or its files changed (rows of older releases record
    neither: kept)."""
    fused_from = earlier.get('topics') or [None, None]
    changed = [f'{named} instead of {was}' for named, was in zip(topics, fused_from)
               if named and was and named != was]
    if changed:
        return f"this run names {', '.join(changed)}"
    if earlier.get('input_files', input_files) != input_files:
        return 'its files changed since it was fused (size or modification time)'
    return ''


def _check_existing(jobs: list[BagJob], resume: bool, overwrite: bool) -> None:
    if resume or overwrite:
        return
    existing = [j.output for j in jobs if j.output.exists()]
    existing += [j.staging for j in jobs if j.staging.exists()]
    if existing:
        shown = ', '.join(map(str, existing[:3])) + (' ...' if len(existing) > 3 else '')
        raise BatchError(f'{len(existing)} output(s) exist ({shown}); pass --resume to keep '
                         'what is finished or --overwrite to replace them')


def _previous_reports(manifest: pathlib.Path, values: dict, transport: str, jobs: list[BagJob],
                      resume: bool, overwrite: bool, window: TimeWindow = TimeWindow()) -> dict:
    """{output: BagReport fields} of the rows an earlier run into the same folder wrote, to keep.

    One manifest describes the folder, with one set of parameters (the transport and the window
    among them: one recorded before they were has the raw images of whole bags). --resume keeps
    every row (the finished ones are skipped) and is refused if the earlier run recorded other
    parameters: its finished bags would be kept as they are, unlike the ones still to fuse. A
    plain run or --overwrite fuses its own bags anew and keeps the rows of the folder's other
    bags when the parameters match; if they differ (or were not recorded), --overwrite drops
    those rows and a plain run is refused when one of them is a finished bag.
    """
    try:
        earlier = json.loads(manifest.read_text())
        rows = {bag['output']: bag for bag in earlier['bags']}
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    recorded, current = earlier.get('parameters'), json.loads(json.dumps(values))
    if recorded is not None:
        # A parameter added since that run had its default's behaviour then.
        recorded = {**json.loads(json.dumps(settings.defaults())), **recorded}
    changed = sorted(name for name in set(recorded or {}) | set(current)
                     if (recorded or {}).get(name) != current.get(name))
    if recorded is not None:
        if earlier.get('transport', 'raw') != transport:
            changed.append('--transport')
        fused_window = earlier.get('window', TimeWindow().options())
        changed += [option for option, value in window.options().items()
                    if fused_window.get(option) != value]
    if resume:
        if recorded is not None and changed:
            raise BatchError(f'--resume: the bags in {manifest.parent} were fused with other '
                             f'parameters ({", ".join(changed)}); resume with the same ones, or '
                             f'pass --overwrite to fuse every bag again')
        return rows
    ours = {str(job.output) for job in jobs}
    others = {output: bag for output, bag in rows.items() if output not in ours}
    if recorded is not None and not changed:
        return others
    finished = [output for output, bag in others.items() if bag.get('status') in FINISHED]
    if overwrite or not finished:
        return {}
    what = (f'other parameters ({", ".join(changed)})' if recorded is not None else
            'parameters its manifest does not record')
    raise BatchError(f'{len(finished)} bag(s) in {manifest.parent} were fused with {what}, and '
                     f'its manifest records one set: fuse into another folder or with the same '
                     f'parameters, or pass --overwrite (the manifest then lists only the bags of '
                     f'this run)')


class _Reporter:
    """In a task: BagFuser's progress bar interface, forwarded to the Progress actor."""

    def __init__(self, box, label: str):
        self.box, self.label, self.pending, self.sent = box, label, 0, time.monotonic()
        self.ip = work._node_ip()

    def update(self, count: int) -> None:
        """Count fused pairs; send them at most every PROGRESS_PERIOD."""
        self.pending += count
        if time.monotonic() - self.sent >= PROGRESS_PERIOD:
            self.flush()

    def set_postfix(self, **values) -> None:
        """Nothing: the driver's bar shows bags and pairs."""

    def flush(self) -> None:
        """Send what was not sent yet."""
        if self.pending:
            self.box.add.remote(self.label, self.ip, self.pending)
        self.pending, self.sent = 0, time.monotonic()


def _run_unit(unit: Unit, box, threads: int) -> dict:
    """Body of a CPU task (and of a GPU actor's calls)."""
    if threads:
        set_threads(threads)
    reporter = _Reporter(box, unit.label)
    try:
        return work.run_unit(unit, reporter)
    finally:
        reporter.flush()


class _GpuWorker:
    """One per GPU share: keeps its models loaded across the units it fuses."""

    def fuse(self, unit: Unit, box) -> dict:
        """Fuse one unit on this actor's GPU."""
        return _run_unit(unit, box, 0)


class _Runner:
    """Submits the units, follows them to the end of each bag, commits segmented bags."""

    def __init__(self, jobs, values, cpus_per_task, gpus_per_worker, segment_minutes, resume,
                 max_retries, progress, on_unit, previous, manifest, topics, transport, window):
        self.ray = None  # Ray's module, once connected: a run with nothing to fuse needs none
        self.jobs, self.values, self.topics = jobs, values, topics
        self.transport, self.window = transport, window
        self.cpus, self.gpus = cpus_per_task, gpus_per_worker
        self.segment_ns = round(segment_minutes * 60e9)
        self.resume, self.retries = resume, max_retries
        (self.on_unit, self.on_progress), self.previous = on_unit, previous
        self.manifest = manifest
        self.manifest_written = -math.inf  # monotonic time of the last write
        self.reports = [BagReport(str(j.input), str(j.output)) for j in jobs]
        self.planned = set()  # bag numbers _plan has reached
        self.show = progress
        self.pending = {}  # ObjectRef -> (bag index, unit or None for a commit, GPU actor)
        self.units = {}  # bag index -> all its units
        self.left = {}  # bag index -> units not finished yet
        # bag index -> its pairs in the bar's total (an estimate) less its parts' thermal frames
        self.overestimate = {}
        self.idle = []  # GPU actors without work
        self.queue = []  # units waiting for a GPU actor
        self.actors = []
        self.live = set()  # GPU actors neither dead nor ended

    def write_manifest(self, **status) -> None:
        """Write the parameters and the bags' reports (``status`` when the run ended, else it is
        running). Rewritten as bags end (at most every MANIFEST_PERIOD s), so that a run killed
        outright still records what it finished but the last seconds, and with which
        parameters; the resumed run's finished bags stay listed until this run has planned
        them, and those it was not given stay listed."""
        bags = [self.previous[r.output] if number not in self.planned and r.output in self.previous
                else dataclasses.asdict(r) for number, r in enumerate(self.reports)]
        ours = {report.output for report in self.reports}
        bags += [bag for output, bag in self.previous.items() if output not in ours]
        write_text_atomically(self.manifest, json.dumps(
            {**(status or {'running': True}), 'parameters': self.values,
             'transport': self.transport, 'window': self.window.options(), 'bags': bags},
            indent=1))
        self.manifest_written = time.monotonic()

    def run(self) -> None:
        self.write_manifest()
        ray = self.ray
        here = ray.get_runtime_context().get_node_id()
        strategy = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(here, soft=False)
        # On the driver's node, so losing a worker node loses no progress counts.
        self.box = ray.remote(num_cpus=0)(Progress).options(
            scheduling_strategy=strategy).remote()
        self.task = ray.remote(_run_unit).options(
            num_cpus=self.cpus, max_retries=self.retries, retry_exceptions=False)
        self.commit_task = ray.remote(work.commit).options(num_cpus=1,
                                                           max_retries=self.retries)
        if self.gpus:
            self._start_actors()
        total_pairs = 0
        for number, job in enumerate(self.jobs):
            total_pairs += self._plan(number, job)
        while self.idle:  # more GPU workers than units: end those without one
            self._release(self.idle.pop())
        self.bar = tqdm(total=total_pairs, unit='pair', desc=self._bags_text(), file=sys.stderr,
                        dynamic_ncols=True, disable=not self.show)
        with self.bar:
            while self.pending:
                ready, _ = ray.wait(list(self.pending), num_returns=1, timeout=PROGRESS_PERIOD)
                for ref in ready:
                    self._finished(ref)
                self._take_progress()
            self._take_progress()
        for job, report in zip(self.jobs, self.reports):
            if report.status == 'failed':  # a dead attempt's partial bag, its retries spent
                work.sweep_partials(job)
        # A cluster outlives the run: free the GPUs and the progress actor now.
        for actor in [*self.actors, self.box]:
            ray.kill(actor)

    def _take_progress(self) -> None:
        for label, ip, pairs in self.ray.get(self.box.take.remote()):
            self.bar.update(pairs)
            if self.on_progress:
                self.on_progress(label, ip, pairs)

    def check_resources(self) -> None:
        """Refuse work no node can take: Ray would wait for such a node forever."""
        if self.gpus:
            gpus = self.ray.cluster_resources().get('GPU', 0)
            if gpus < self.gpus:
                raise BatchError(f'--gpus-per-worker {self.gpus:g}: the cluster has {gpus:g} '
                                 'GPUs')
            return
        largest = max((node['Resources'].get('CPU', 0) for node in self.ray.nodes()
                       if node['Alive']), default=0)
        if self.cpus > largest:
            raise BatchError(f'--cpus-per-task {self.cpus}: no node of the cluster has that '
                             f'many CPUs (at most {largest:g})')

    def _start_actors(self) -> None:
        ray = self.ray
        count = int(ray.cluster_resources().get('GPU', 0) // self.gpus)
        actor = ray.remote(_GpuWorker).options(
            num_gpus=self.gpus, num_cpus=1, max_restarts=self.retries,
            max_task_retries=self.retries)
        self.actors = [actor.remote() for _ in range(count)]
        self.idle, self.live = list(self.actors), set(self.actors)

    def _plan(self, number: int, job: BagJob) -> int:
        """Plan a bag, submit what is left of it; return its pairs still to fuse (estimated).
        A bag that cannot be read or staged (a dangling link in it, a full disk) fails alone."""
        report = self.reports[number]
        self.planned.add(number)
        try:
            return self._plan_bag(number, job, report)
        except (BagError, OSError) as error:
            report.status, report.error = 'failed', str(error)
            self._line(report)
            return 0

    def _plan_bag(self, number: int, job: BagJob, report: BagReport) -> int:
        work.sweep_partials(job)
        # On --resume an existing output is kept when the manifest lists it as finished (the
        # parameters were compared at the start) from the topics this run names, if it names
        # any: detected ones follow from the bag and the parameters, and a finished bag is not
        # opened again (a file-compressed one unpacks whole). Any other is fused again: it may
        # come from other parameters (a killed --overwrite run), other topics or a dead attempt.
        # A bag recorded or copied again under its name since is fused again too.
        report.input_files = work.input_identity(job.input)
        earlier, reason = self._finished_earlier(job, report.input_files)
        if earlier and not reason:
            self._skip(job, report, earlier)
            self._line(report)
            return 0
        if reason:
            tqdm.write(f's4fusion-batch: fusing {report.input} again: {reason}', file=sys.stderr)
        units = work.plan_bag(job, self.values, self.segment_ns, self.topics, self.transport,
                              self.window)
        report.topics, report.units = list(units[0].topics), len(units)
        self.units[number] = units
        if len(units) == 1:
            shutil.rmtree(job.staging, ignore_errors=True)
            todo = units
        else:
            todo = work.prepare_staging(job, units, self.resume)
            for unit in units:
                if unit not in todo:
                    self._count(report, work.unit_result(unit))
        self.left[number] = set(unit.index for unit in todo)
        for unit in todo:
            self._submit(number, unit)
        if not todo:
            self._commit(number)
        pairs = round(units[0].thermal_count * len(todo) / len(units))
        self.overestimate[number] = pairs
        return pairs

    def _finished_earlier(self, job: BagJob, input_files: list) -> tuple[dict, str]:
        """On --resume, the manifest's row of a bag it lists as finished whose output exists,
        and why that bag is to be fused again all the same ('' to keep it); ({}, '') for any
        other bag."""
        earlier = self.previous.get(str(job.output), {})
        if not (self.resume and job.output.exists() and earlier.get('status') in FINISHED):
            return {}, ''
        return earlier, _changed_since(earlier, self.topics, input_files)

    def keep_all_if_finished(self) -> bool:
        """On --resume, keep every bag as an earlier run fused it where the manifest lists each
        as finished and unchanged since (nothing to fuse: no Ray needed), without a line for
        each: the caller says it once. False, keeping none, where any bag is left to fuse."""
        finished = []
        for job in self.jobs:
            try:
                input_files = work.input_identity(job.input)
            except OSError:  # unreadable now: it fails when planned
                return False
            earlier, reason = self._finished_earlier(job, input_files)
            if reason or not earlier:
                return False
            finished.append((input_files, earlier))
        for number, (job, (input_files, earlier)) in enumerate(zip(self.jobs, finished)):
            self.planned.add(number)
            work.sweep_partials(job)
            self.reports[number].input_files = input_files
            self._skip(job, self.reports[number], earlier)
        return True

    def _skip(self, job: BagJob, report: BagReport, earlier: dict) -> None:
        """Keep a bag the manifest lists as finished, with its earlier counts."""
        shutil.rmtree(job.staging, ignore_errors=True)  # committed, not yet cleaned up
        for name in ('pairs', 'fused', 'unpaired', 'dropped', 'failed', 'units', 'nodes',
                     'topics', 'seconds', 'warnings'):
            setattr(report, name, earlier.get(name, getattr(report, name)))
        report.status = 'skipped'

    def _submit(self, number: int, unit: Unit) -> None:
        if not self.gpus:
            self.pending[self.task.remote(unit, self.box, self.cpus)] = (number, unit, None)
        elif self.idle:
            actor = self.idle.pop()
            self.pending[actor.fuse.remote(unit, self.box)] = (number, unit, actor)
        else:
            self.queue.append((number, unit))

    def _release(self, actor) -> None:
        """Give a GPU worker that finished a unit the next queued one; with none queued (none
        come later: every bag was planned before the first finished), end it, so that its GPUs
        are free for a worker that Ray restarts elsewhere after losing its node."""
        if self.queue:
            number, unit = self.queue.pop(0)
            self.pending[actor.fuse.remote(unit, self.box)] = (number, unit, actor)
        else:
            self.ray.kill(actor)
            self.live.discard(actor)

    def _retire(self, actor) -> None:
        """Drop a dead GPU worker; when none is left, fail the units still queued for one."""
        self.ray.kill(actor)
        self.live.discard(actor)
        while self.queue and not self.live:
            number, unit = self.queue.pop(0)
            self._unit_finished(number, unit, {
                'label': unit.label, 'index': unit.index,
                'error': 'no GPU worker left to fuse it: each died (see the errors above)'})

    def _commit(self, number: int) -> None:
        job = self.jobs[number]
        ref = self.commit_task.remote(job, self.units[number])
        self.pending[ref] = (number, None, None)

    def _finished(self, ref) -> None:
        number, unit, actor = self.pending.pop(ref)
        report = self.reports[number]
        try:
            result = self.ray.get(ref)
        except self.ray.exceptions.RayError as error:  # retries spent, or a bug in a task
            # A task's own exception, where it raised one: Ray's wrapper names only the task.
            cause = getattr(error, 'cause', None) or error
            result = {'label': unit.label if unit else report.input,
                      'index': unit.index if unit else -1,
                      'error': f'{type(cause).__name__}: {cause}'.splitlines()[0]}
            if isinstance(error, self.ray.exceptions.ActorDiedError):
                self._retire(actor)  # dead, its restarts spent: it takes no more units
                actor = None
        if actor is not None:
            self._release(actor)
        if unit is None:  # a commit
            self._done(number, result)
            return
        self._unit_finished(number, unit, result)

    def _unit_finished(self, number: int, unit: Unit, result: dict) -> None:
        report = self.reports[number]
        if self.on_unit:
            self.on_unit(result)
        for warning in result.get('warnings', []):  # each part of a bag finds them anew
            if warning not in report.warnings:
                report.warnings.append(warning)
                tqdm.write(f's4fusion-batch: {warning}', file=sys.stderr)
        if result['error']:
            if report.status != 'failed':
                report.status, report.error = 'failed', result['error']
                self._line(report)
            return
        self._count(report, result)
        self.overestimate[number] -= result['thermal_read']
        self.left[number].discard(unit.index)
        if not self.left[number] and report.status != 'failed':
            # Its share of the bar's total, the window's share of the bag's span until now
            # (wrong where the camera started late or paused), becomes the thermal frames its
            # parts read, as s4fusion-bag counts its total: the bar ends at 100% less the
            # frames left unpaired, not past it.
            self.bar.total -= self.overestimate.pop(number)
            self.bar.refresh()
            if len(self.units[number]) > 1:
                self._commit(number)
            else:
                self._done(number, None)

    def _count(self, report: BagReport, result: dict) -> None:
        for name in ('pairs', 'fused', 'unpaired', 'dropped', 'failed'):
            setattr(report, name, getattr(report, name) + result.get(name, 0))
        report.seconds += result['seconds']
        if result.get('ip'):
            report.nodes = sorted(set(report.nodes) | {result['ip']})

    def _done(self, number: int, result) -> None:
        report = self.reports[number]
        if result and result.get('error'):
            report.status, report.error = 'failed', result['error']
        else:
            report.status = 'done'
            work.sweep_partials(self.jobs[number])  # what attempts lost with a node left
            shutil.rmtree(self.jobs[number].staging, ignore_errors=True)  # a whole bag's counts
        self._line(report)

    def _line(self, report: BagReport) -> None:
        if report.status == 'failed':
            text = ('FAILED ' + ('' if report.error.startswith(report.input)
                                 else f'{report.input}: ') + report.error)
        elif report.status == 'skipped':
            text = f'skipped {report.input}: {report.output} is finished'
        else:
            failed = f'{report.failed} failed in inference, ' if report.failed else ''
            text = (f'done {report.input} -> {report.output}: {report.fused} pairs fused, '
                    f'{failed}{report.unpaired} unpaired, {report.dropped} dropped '
                    f'({report.seconds:.1f} task-s)')
        bar = getattr(self, 'bar', None)
        if bar is not None:
            bar.set_description(self._bags_text())
        tqdm.write(f's4fusion-batch: {text}', file=sys.stderr)
        if time.monotonic() - self.manifest_written >= MANIFEST_PERIOD:
            self.write_manifest()

    def _bags_text(self) -> str:
        finished = sum(r.status != 'pending' for r in self.reports)
        return f'bags {finished}/{len(self.reports)}'

    def stop(self) -> None:
        """Cancel the cluster's work (Ctrl-C) and sweep what the killed attempts left."""
        ray = self.ray
        for ref, (_, _, actor) in list(self.pending.items()):
            if actor is None:
                ray.cancel(ref, force=True)
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        deadline = time.monotonic() + 30
        refs = list(self.pending)
        while refs and time.monotonic() < deadline:
            _, refs = ray.wait(refs, num_returns=len(refs), timeout=1)
        for job in self.jobs:
            work.sweep_partials(job)
