"""The S4Fusion training loop: AdamW, warm-up + cosine schedule, resumable checkpoints, step log.

Files in the output folder:
  ``train_state.pt``       resumable state: model, optimizer, scheduler, step, RNG, settings.
  ``s4fusion_<preset>.*``  the weights so far (safetensors + JSON, via ``save_checkpoint``); the
                           JSON holds the training settings, data list, loss and deviations.
  ``train_log.jsonl``      one JSON object per step: step, lr, loss, its terms, seconds.
  ``checkpoints/``         with ``keep_every``: the weights of every such step, kept
                           (``s4fusion_<preset>-step<step>.*``), to choose among on a validation
                           split; the weights above are replaced at each checkpoint.

The training state is a ``torch.save`` file holding only tensors and plain Python values, so it
loads with ``weights_only=True`` (no code runs on load). safetensors would need the optimizer's
nested per-parameter state and param groups flattened into names plus a JSON side file, and two
files cannot be replaced atomically together.
"""

import contextlib
import dataclasses
import functools
import io
import json
import logging
import logging.handlers
import math
import pathlib
import pickle
import random
import sys
import time
import zipfile

import numpy as np
import torch
from tqdm import tqdm

from ..cli import one_line_reason
from ..model import S4Fusion, S4FusionConfig, load_checkpoint, save_checkpoint
from ..files import write_atomically
from ..model.checkpoint import config_path, file_sha256, read_config
from ..model.scan import scan_backend
from .data import check_sampling
from .loss import complete_config as complete_loss_config

STATE_NAME = 'train_state.pt'
LOG_NAME = 'train_log.jsonl'
KEPT_DIR = 'checkpoints'
# SSM dynamics parameters (A as log, skip D, dt bias) stay out of weight decay as in Mamba/VMamba:
# decay would pull them toward values that change the dynamics rather than regularise.
NO_DECAY_NAMES = ('A_logs', 'Ds', 'dt_projs_bias')
# A schedule fitted to a deadline (Trainer.run's fit_by) is timed from the session's step
# FIT_FROM, after a timed checkpoint, over FIT_STEPS steps: the first CUDA steps of a process are
# slow (kernels load, the allocator and autotuning warm up), a resumed session's too.
FIT_FROM, FIT_STEPS = 5, 20
FIT_MARGIN = 0.05  # of the time left, kept free by a fitted schedule: the step rate drifts


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """Hyper-parameters of one training run (all recorded with the weights).

    ``warmup_steps`` None means 5 % of the steps (at most 500). The learning rate rises linearly
    over the warm-up, then follows a cosine down to ``min_lr_ratio`` of ``lr`` at the last step.
    The defaults fit about 90 minutes on two CPU cores with the compact preset.
    """

    steps: int = 2000
    batch_size: int = 8
    crop: int = 97
    # The dataset's gain augmentation (PairFolderDataset; 1 = off). On by default: without it the
    # networks learned to follow the thermal image and kept dim thermal scenes dim (issue 4 notes).
    min_gain: float = 0.15
    # The dataset's draw of pairs across datasets (PairFolderDataset; 0 = every pair alike).
    dataset_balance: float = 0.0
    # 80-step probes (compact, batch 4, crop 49) were stable at 5e-4 and 2e-3, the latter faster;
    # 1e-3 keeps a margin for the wider authors preset and longer runs.
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = None
    min_lr_ratio: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self):
        """Resolve the default warm-up and reject settings that cannot train."""
        if self.steps < 1 or self.batch_size < 1 or not 0 < self.lr < math.inf:
            raise ValueError('steps, batch_size and lr must be positive, lr finite')
        # numpy's seeding takes 0 <= seed < 2**32 (np.random.seed)
        if not 0 <= self.seed < 2**32:
            raise ValueError(f'seed must be from 0 to 2**32 - 1, got {self.seed}')
        if self.warmup_steps is None:
            object.__setattr__(self, 'warmup_steps', max(1, min(500, self.steps // 20)))
        if self.warmup_steps > self.steps:  # the learning rate would never reach its peak
            raise ValueError(f'warmup_steps {self.warmup_steps} must be at most steps '
                             f'{self.steps}')
        check_sampling(self.crop, self.min_gain, self.dataset_balance)


def check_new_run(out_dir):
    """FileExistsError if ``out_dir`` holds what a new run there would overwrite or mix with: a
    run's training state, or an earlier run's weights or their JSON (of any preset: a run whose
    state was removed to save space) or kept checkpoints. A log alone is of a run stopped before
    its first checkpoint: it is replaced."""
    out_dir = pathlib.Path(out_dir)
    state = out_dir / STATE_NAME
    if state.exists():
        raise FileExistsError(f'{state} exists: resume it (--resume) or use another output folder')
    earlier = earlier_weights(out_dir)
    if earlier:
        raise FileExistsError(f'{earlier[0]} exists (an earlier run, without its training state '
                              'to resume): use another output folder, or remove '
                              f'{", ".join(path.name for path in earlier)} to start again here')


def earlier_weights(out_dir: pathlib.Path) -> list:
    """The weights, their JSON and the kept checkpoints of an earlier run in ``out_dir``."""
    return sorted([*out_dir.glob('s4fusion_*.safetensors'), *out_dir.glob('s4fusion_*.json'),
                   *(out_dir / KEPT_DIR).glob('*.safetensors')])


def kept_weights_path(weights, step):
    """Where ``keep_every`` keeps the weights of ``step``: ``checkpoints/<stem>-step<step>``
    beside ``weights`` (zero-padded, so the files list in step order)."""
    weights = pathlib.Path(weights)
    return weights.parent / KEPT_DIR / f'{weights.stem}-step{step:06d}{weights.suffix}'


def weights_path(out_dir, config):
    """Where a run into ``out_dir`` writes its weights: ``s4fusion_<preset>.safetensors`` (its
    JSON beside it), ``s4fusion_custom.*`` for a configuration that is no preset's."""
    return pathlib.Path(out_dir) / f's4fusion_{config.preset_name() or "custom"}.safetensors'


def lr_factor(step, warmup, total, min_ratio):
    """Learning-rate multiplier for the optimizer step with index ``step`` (0-based)."""
    if step < warmup:
        return (step + 1) / warmup
    # The last step is the cosine's end, also where it is the only step after the warm-up (total
    # - 1 == warmup): a divisor of max(1, 0) left that step at the peak learning rate.
    progress = (step - warmup) / (total - 1 - warmup) if total - 1 > warmup else 1.0
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def load_exported(path, device, role='features', batch_shape=None):
    """A network saved with ``torch.export.save`` (a .pt2 file), frozen, on ``device``.

    This is how pretrained feature extractors and classifiers reach the loss without this package
    depending on torchvision or their weights. Export the network in eval mode, taking (B, 1, H, W)
    luminance in [0, 1] (the wrapper does any channel repeat and normalisation), with dynamic batch
    and spatial dimensions or exactly the training batch and crop. With ``batch_shape`` (B, 1, H,
    W) it is run once on zeros of that shape and refused unless it returns what its ``role``
    needs: (B, C, h, w) feature maps (one tensor or a list) or (B, K) 'classifier' logits, so a
    wrong network fails here with its path named, not inside the first training step.
    """
    try:
        with _torch_export_log_held() as logged:
            module = torch.export.load(str(path)).module()
    except (RuntimeError, ValueError, KeyError, zipfile.BadZipFile) as error:
        # For a file that is no .pt2 archive torch logs why, then tries its older format, whose
        # failure says only 'not a zip file' or 'check the warnings above'.
        fault = next((record.exc_info[1] for record in logged if record.exc_info), error)
        raise ValueError(f'{path}: not a network saved with torch.export.save '
                         f'({one_line_reason(fault)})') from error
    module = module.to(device).requires_grad_(False)
    if batch_shape is not None:
        _check_exported(module, path, device, role, tuple(batch_shape))
    return module


@contextlib.contextmanager
def _torch_export_log_held():
    """The records torch.export logs while the block runs, held back from stderr until it ends
    well: on a file that is no .pt2 archive it logs a traceback there (as a warning) before
    raising, which load_exported says on one line instead."""
    logger = logging.getLogger('torch.export')  # with its own handler, not propagating
    held = logging.handlers.BufferingHandler(capacity=sys.maxsize)  # never flushed
    handlers, logger.handlers = logger.handlers, [held]
    try:
        yield held.buffer
    finally:
        logger.handlers = handlers
    for record in held.buffer:  # loaded: its warnings (an older format, say) are shown
        logger.handle(record)


def _check_exported(module, path, device, role, batch_shape):
    """Refuse an exported network that cannot serve as `role` on `batch_shape` inputs."""
    wanted = ('(B, K) logits' if role == 'classifier'
              else 'a (B, C, h, w) feature map or a list of them')
    try:
        with torch.no_grad():
            output = module(torch.zeros(batch_shape, device=device))
    # An exported program's shape guards fail with AssertionError, its operators with others.
    except (AssertionError, RuntimeError, ValueError, TypeError, IndexError) as error:
        raise ValueError(f'{path}: the {role} network does not take the training batch '
                         f'{batch_shape} (B, 1, crop, crop): {error}') from None
    outputs = (list(output) if isinstance(output, (list, tuple)) and role != 'classifier'
               else [output])
    ndim = 2 if role == 'classifier' else 4
    if not outputs or not all(torch.is_tensor(out) and out.ndim == ndim
                              and out.shape[0] == batch_shape[0] for out in outputs):
        got = [tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
               for out in outputs]
        raise ValueError(f'{path}: the {role} network must return {wanted} for a batch of '
                         f'{batch_shape[0]}; it returned {got}')


def device_name(device):
    """The GPU's name for a CUDA ``device`` (torch.cuda.get_device_name), else its type."""
    return torch.cuda.get_device_name(device) if device.type == 'cuda' else device.type


def seed_everything(seed):
    """Seed Python, NumPy and torch (CPU and CUDA) generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state():
    numpy_state = np.random.get_state()
    state = {
        'torch': torch.get_rng_state(),
        'numpy': torch.from_numpy(numpy_state[1].astype(np.int64)),
        'numpy_pos': [int(v) for v in numpy_state[2:4]] + [float(numpy_state[4])],
        'python': random.getstate(),
    }
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state):
    torch.set_rng_state(state['torch'])
    pos, has_gauss, cached = state['numpy_pos']
    np.random.set_state(('MT19937', state['numpy'].numpy().astype(np.uint32), int(pos),
                         int(has_gauss), cached))
    version, internal, gauss = state['python']
    random.setstate((version, tuple(internal), gauss))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


class Trainer:
    """Trains an S4Fusion model of ``config`` on ``dataset`` with ``loss``, writing to ``out_dir``.

    The model is built after seeding, so its initial weights, the batches (drawn from a generator
    seeded with (seed, step)) and the whole run are a function of the settings. ``deviation`` is
    a sentence recorded with the weights saying how this training differs from the authors'.
    """

    def __init__(self, config, dataset, loss, out_dir, settings, device='cpu', deviation='',
                 init_weights=None, weights_dtype=torch.float32):
        """Build the model, optimizer and schedule; nothing is written until ``run``.

        ``init_weights``: a checkpoint of the same configuration to start from instead of the
        initialisation (fine-tuning); its file hash and training record go into this run's.
        ``weights_dtype``: how the exported weights are stored (float16 halves the file, int8
        about quarters it, see checkpoint.STORAGE_DTYPES); the training state keeps float32.
        """
        for name in ('crop', 'min_gain', 'dataset_balance'):
            if getattr(dataset, name) != getattr(settings, name):
                raise ValueError(f'dataset {name} {getattr(dataset, name)} != settings {name} '
                                 f'{getattr(settings, name)}')
        self.config, self.dataset, self.settings = config, dataset, settings
        self.weights_dtype = weights_dtype
        self.device = torch.device(device)
        self.out_dir = pathlib.Path(out_dir)
        self.deviation = deviation
        seed_everything(settings.seed)
        self.model = S4Fusion(config, device=self.device, dtype=torch.float32)
        self.init = None
        if init_weights is not None:
            self.init = self._load_init(pathlib.Path(init_weights))
        elif config.base != 'none':
            self.model.start_at_base()  # a correction of the base, from none
        self.loss = loss.to(self.device)
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            skip = param.dim() < 2 or name.rsplit('.', 1)[-1] in NO_DECAY_NAMES
            (no_decay if skip else decay).append(param)
        self.optimizer = torch.optim.AdamW(
            [{'params': decay, 'weight_decay': settings.weight_decay},
             {'params': no_decay, 'weight_decay': 0.0}], lr=settings.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_lambda())
        self.step = 0
        self.seconds = 0.0  # training time summed over all sessions of this run
        self.schedule_fit = None  # fit_schedule's record, once the schedule was fitted
        self.checkpoint_seconds = None  # how long the last checkpoint took to write

    def _lr_lambda(self):
        return functools.partial(lr_factor, warmup=self.settings.warmup_steps,
                                 total=self.settings.steps, min_ratio=self.settings.min_lr_ratio)

    def fit_schedule(self, steps, steps_per_s):
        """Shorten the schedule to ``steps`` (never lengthen it), the warm-up keeping its share
        of the steps, from the current step on; ``steps_per_s`` (what the steps were fitted to) is
        recorded with it, in the weights' JSON and the training state."""
        asked = self.settings
        steps = max(self.step, min(steps, asked.steps))
        self._apply_fit({
            'steps_asked': asked.steps, 'warmup_asked': asked.warmup_steps, 'steps': steps,
            'warmup_steps': max(1, round(asked.warmup_steps * steps / asked.steps)),
            'steps_per_s': round(steps_per_s, 3), 'at_step': self.step})

    def _apply_fit(self, fit):
        """Train to ``fit``'s steps and warm-up from now on (fit_schedule, or a fitted run's
        state resumed), the learning rate of the next step included."""
        self.settings = dataclasses.replace(self.settings, steps=fit['steps'],
                                            warmup_steps=fit['warmup_steps'])
        self.schedule_fit = fit
        factor = self._lr_lambda()
        self.scheduler.lr_lambdas = [factor] * len(self.optimizer.param_groups)
        for group, base_lr in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group['lr'] = base_lr * factor(self.scheduler.last_epoch)

    def _load_init(self, path):
        """Load the starting weights; returns their record (name, sha256, training)."""
        start = load_checkpoint(path)  # a missing or unusable file is named as such
        meta, config = read_config(path)
        if config != self.config:
            ours, theirs = self.config.to_dict(), config.to_dict()
            differing = ', '.join(f'{k} {theirs[k]} != {ours[k]}' for k in ours
                                  if theirs[k] != ours[k])
            raise ValueError(f'{path}: its configuration differs from the one being trained '
                             f'({self.config.preset_name() or "custom"}): {differing}')
        self.model.load_state_dict(start.state_dict())
        return {'file': path.name, 'sha256': file_sha256(path),
                'training': meta.get('training')}

    @property
    def weights_path(self):
        """Where the weights go (see ``weights_path``)."""
        return weights_path(self.out_dir, self.config)

    def identity(self):
        """What must match for a checkpoint to continue this run (JSON-ready)."""
        return {
            'model': self.config.to_dict(),
            'settings': dataclasses.asdict(self.settings),
            'loss': self.loss.config(),
            'data': [p.label for p in self.dataset.pairs],
            'init': None if self.init is None else self.init['sha256'],
        }

    def resume(self):
        """Continue from the training state in ``out_dir``; returns its step."""
        path = self.out_dir / STATE_NAME
        if not path.exists():
            earlier = earlier_weights(self.out_dir)
            if earlier:  # a kill while the first checkpoint was written, or the state removed
                raise FileNotFoundError(
                    f'{self.out_dir}: no {STATE_NAME} to resume, only weights saved without it '
                    f'({", ".join(p.name for p in earlier)}: a run killed while writing its '
                    'first checkpoint, or its state removed); start the run without --resume in '
                    'another output folder, or remove them to start again here')
            raise FileNotFoundError(f'{self.out_dir}: no {STATE_NAME} to resume (a run saves it '
                                    'at its first checkpoint); start the run without --resume')
        try:
            state = torch.load(path, map_location='cpu', weights_only=True)
            saved = json.loads(state['identity'])
            missing = sorted({'model', 'optimizer', 'scheduler', 'rng', 'step', 'seconds'}
                             - state.keys()) + sorted({'model', 'loss'} - saved.keys())
            if missing:
                raise KeyError(f'no {", ".join(missing)}')
            # Compared as configurations, so a field added since (at its default) still matches.
            saved['model'] = S4FusionConfig.from_dict(saved['model']).to_dict()
            saved['loss'] = complete_loss_config(saved['loss'])
            fit = state.get('schedule_fit')
        # What torch's weights-only unpickler raises on other files varies (KeyError on junk).
        except (RuntimeError, pickle.UnpicklingError, EOFError, OSError, KeyError, TypeError,
                ValueError, AttributeError) as error:
            raise ValueError(f'{path}: not a readable training state '
                             f'({type(error).__name__}: {one_line_reason(error)})') from None
        # A schedule fitted to a time limit resumes as fitted where the steps asked are the same.
        if fit and (fit['steps_asked'], fit['warmup_asked']) == (self.settings.steps,
                                                                 self.settings.warmup_steps):
            self._apply_fit(fit)
        current = self.identity()
        differing = [_difference(key, saved.get(key), current[key]) for key in current
                     if saved.get(key) != current[key]]
        if differing:
            raise ValueError(f'{path}: was written by a run with other {"; ".join(differing)}; '
                             f'resume needs the same model, settings, loss, data and starting '
                             f'weights')
        self.model.load_state_dict(state['model'])
        self.optimizer.load_state_dict(state['optimizer'])
        self.scheduler.load_state_dict(state['scheduler'])
        _set_rng_state(state['rng'])
        self.step, self.seconds = int(state['step']), float(state['seconds'])
        self._truncate_log()
        return self.step

    def _truncate_log(self):
        """Drop log lines of steps after the resumed one (done after the last checkpoint).

        The log is appended line by line, so a crash can leave its last line torn (cut short, or
        NUL bytes after a power loss): the log ends there, and the steps after the checkpoint
        are run and logged again anyway.
        """
        log = self.out_dir / LOG_NAME
        if not log.exists():
            return
        lines = []
        with open(log, errors='replace') as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    step = json.loads(line)['step']
                except (json.JSONDecodeError, KeyError, TypeError):
                    break
                if step <= self.step:
                    lines.append(line if line.endswith('\n') else line + '\n')
        write_atomically(log, lambda f: f.write(''.join(lines).encode()))

    def save(self, last_loss, keep=False):
        """Write the weights so far (and, if ``keep``, a copy kept under ``checkpoints/``), then
        the training state (each atomically).

        The state goes last: it is what a resume starts from, so a crash between the files
        leaves a state no newer than the weights, and the resumed run writes them again.
        Weights a step made non-finite (from a finite loss) are refused, so that the last
        checkpoint stays one that can be used.
        """
        state_path = self.out_dir / STATE_NAME
        first = not state_path.exists()
        if not all(torch.isfinite(parameter).all() for parameter in self.model.parameters()):
            raise FloatingPointError(
                f'the weights are not finite after step {self.step} (a lower --lr may help); '
                + ('nothing was saved' if first else 'the last checkpoint stays as it was'))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        training = {
            **self.identity()['settings'], 'steps_done': self.step,
            'optimizer': 'AdamW (no decay on norms, biases, A_logs, Ds, dt bias)',
            'schedule': 'linear warm-up, cosine to min_lr_ratio', 'loss': self.loss.config(),
            'data': self.identity()['data'], 'device': self.device.type,
            'device_name': device_name(self.device),
            # A resume repeats a CPU run bit for bit on as many threads (docs/training.md).
            **({'cpu_threads': torch.get_num_threads()} if self.device.type == 'cpu' else {}),
            'scan': scan_backend(torch.empty(0, device=self.device)),
            'torch': torch.__version__, 'seconds': round(self.seconds, 1),
            'last_loss': last_loss, 'deviation': self.deviation,
        }
        if self.init is not None:
            training['initialised_from'] = self.init
        if self.schedule_fit is not None:
            training['schedule_fit'] = self.schedule_fit
        begun = time.monotonic()
        paths = [self.weights_path]
        if keep:
            paths.append(kept_weights_path(self.weights_path, self.step))
            paths[-1].parent.mkdir(exist_ok=True)
        state = {
            'model': self.model.state_dict(), 'optimizer': self.optimizer.state_dict(),
            'scheduler': self.scheduler.state_dict(), 'step': self.step,
            'seconds': self.seconds, 'rng': _rng_state(), 'identity': json.dumps(self.identity()),
            'schedule_fit': self.schedule_fit,
        }
        try:
            for path in paths:
                save_checkpoint(self.model, path, extra_meta={'training': training},
                                storage_dtype=self.weights_dtype)
            # Serialized in memory, then written: torch.save into the file, on a full disk,
            # hid the write's OSError behind its zip writer's RuntimeError (a traceback).
            serialized = io.BytesIO()
            torch.save(state, serialized)
            write_atomically(state_path, lambda f: f.write(serialized.getbuffer()))
        except OSError:  # a full disk, say
            if first:  # weights without a state: no resume, and a new run here is refused
                for path in paths:
                    path.unlink(missing_ok=True)
                    config_path(path).unlink(missing_ok=True)
            raise
        self.checkpoint_seconds = time.monotonic() - begun

    def train_step(self):
        """One optimizer step on the batch of the current step; returns its log record."""
        start = time.perf_counter()
        ir, vi = self.dataset.sample_batch(
            self.settings.batch_size, np.random.default_rng([self.settings.seed, self.step]))
        ir, vi = ir.to(self.device), vi.to(self.device)
        lr = self.optimizer.param_groups[0]['lr']
        self.model.train()
        total, terms = self.loss(self.model(ir, vi), ir, vi)
        if not torch.isfinite(total):
            raise FloatingPointError(f'loss is {total.detach().item()} at step {self.step + 1} '
                                     '(a lower --lr may help); the last checkpoint stays as it '
                                     'was')
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        seconds = time.perf_counter() - start
        self.seconds += seconds
        return {'step': self.step, 'lr': lr, 'loss': float(total.detach()),
                **{k: float(v) for k, v in terms.items()}, 'seconds': round(seconds, 4)}

    def end_step(self, stop_at=None):
        """The step a session stopping at ``stop_at`` (None: the schedule's end) trains to; a
        schedule fitted to a time limit moves it."""
        return self.settings.steps if stop_at is None else min(self.settings.steps, stop_at)

    def run(self, stop_at=None, checkpoint_every=200, progress=True, should_stop=None,
            saving=contextlib.nullcontext, keep_every=0, fit_by=None):
        """Train up to ``settings.steps`` (or ``stop_at``, to split a run into sessions).

        Writes the state and weights every ``checkpoint_every`` steps and at the end, and every
        ``keep_every`` steps (0: never) a checkpoint whose weights are also kept under
        ``checkpoints/``; returns the log records of the steps run in this call. ``should_stop``
        (no arguments) is asked after every step; when it says True the run ends there with a
        checkpoint, as at ``stop_at``. Each checkpoint is written inside ``saving()`` (a context
        manager: the command line holds a second stop signal there, so the weights, their JSON
        and the state are written whole). ``fit_by`` (a ``time.monotonic`` deadline): a run
        whose schedule was not fitted yet times a checkpoint after this call's FIT_FROMth step
        and the FIT_STEPS steps after it, then shortens its schedule (``fit_schedule``) to end by
        then, its checkpoints and FIT_MARGIN of the time left included.
        """
        if self.step == 0:
            check_new_run(self.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        records = []
        fitting = fit_by is not None and self.schedule_fit is None
        timed_from = None  # (time.monotonic(), step) after the timed checkpoint
        session_start = self.step

        def kept():
            return keep_every > 0 and self.step % keep_every == 0

        bar = tqdm(total=self.settings.steps, initial=self.step, desc='train', unit='step',
                   disable=not progress, dynamic_ncols=True)
        with bar, open(self.out_dir / LOG_NAME, 'a' if self.step else 'w') as log:
            while self.step < self.end_step(stop_at) and not (should_stop and should_stop()):
                record = self.train_step()
                records.append(record)
                log.write(json.dumps(record) + '\n')
                log.flush()
                # Shown with the count, at the bar's pace: a refresh of its own every step
                # wrote a line per step into a log file.
                bar.set_postfix({k: f'{v:.4g}' for k, v in record.items()
                                 if k not in ('step', 'seconds')}, refresh=False)
                bar.update()
                timed_checkpoint = (fitting and timed_from is None
                                    and self.step - session_start >= FIT_FROM)
                if ((kept() or self.step % checkpoint_every == 0 or timed_checkpoint)
                        and self.step < self.end_step(stop_at)):
                    with saving():
                        self.save(record['loss'], kept())
                if timed_checkpoint:
                    timed_from = (time.monotonic(), self.step)
                elif fitting and timed_from and self.step - timed_from[1] >= FIT_STEPS:
                    self._fit_to(fit_by, timed_from, checkpoint_every, keep_every)
                    fitting = False
                    bar.total = self.settings.steps
        if records:
            with saving():
                self.save(records[-1]['loss'], kept())
        return records

    def _fit_to(self, deadline, timed_from, checkpoint_every, keep_every):
        """fit_schedule to end by ``deadline``, at the pace of the steps since ``timed_from``
        ((time.monotonic(), step)) and the time the last checkpoint took for each to come."""
        now = time.monotonic()
        step_s = (now - timed_from[0]) / (self.step - timed_from[1])
        checkpoint_s = self.checkpoint_seconds
        saves_per_step = 1 / checkpoint_every + (1 / keep_every if keep_every else 0)
        budget_s = (deadline - now) * (1 - FIT_MARGIN) - checkpoint_s  # the last one
        more = max(0, math.floor(budget_s / (step_s + saves_per_step * checkpoint_s)))
        asked = self.settings.steps
        self.fit_schedule(self.step + more, 1 / step_s)
        how = 'shortened' if self.settings.steps < asked else 'unchanged'
        tqdm.write(f'schedule fitted to the time limit after step {self.step}: '
                   f'{self.settings.steps} steps of the {asked} asked ({how}; warm-up '
                   f'{self.settings.warmup_steps}), at {1 / step_s:.2f} steps/s and '
                   f'{checkpoint_s:.2f} s a checkpoint', file=sys.stderr)


def _difference(key, saved, current):
    """``key`` of a training identity that differs, with the fields that differ where it is a
    dict (settings, loss, model) and the sizes where it is the list of pairs."""
    if isinstance(saved, dict) and isinstance(current, dict):
        fields = sorted(field for field in saved.keys() | current.keys()
                        if saved.get(field) != current.get(field))
        return f'{key} (' + ', '.join(f'{field} {saved.get(field)!r}, now '
                                      f'{current.get(field)!r}' for field in fields) + ')'
    if isinstance(saved, list) and isinstance(current, list):
        return (f'{key} ({len(saved)} pairs, now {len(current)})' if len(saved) != len(current)
                else f'{key} (as many pairs, {len(saved)}, but not the same)')
    if key == 'init':
        def weights(sha256):
            return f'weights of sha256 {sha256[:16]}' if sha256 else 'no weights'
        return f'init (--init-weights: {weights(saved)}, now {weights(current)})'
    return key
