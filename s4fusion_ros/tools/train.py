"""s4fusion-train: train S4Fusion on infrared/visible pairs (CPU or CUDA), resumably.

Examples (the default 2000 steps in two sessions):
  s4fusion-train --preset compact --data IVIF_DIR --out runs/compact --stop-at 1000
  s4fusion-train --preset compact --data IVIF_DIR --out runs/compact --resume
"""

import argparse
import contextlib
import dataclasses
import math
import os
import pathlib
import signal
import sys
import time

import torch

from ..cli import READER_LEFT, STOP_SIGNALS, WritesThatCannotFail, output_path, run_command
from ..files import check_writable_folder, held_folder
from ..imaging.normalization import raw_counts_warning
from ..model import S4FusionConfig
from ..model.checkpoint import (STORAGE_DTYPES, CheckpointError, config_path, file_sha256,
                                load_checkpoint, read_config)
from ..model.s4fusion import BASE_ENHANCEMENTS, BASES
from ..runtime import DeviceError, resolve_device
from ..training.data import (PairFolderDataset, training_data_note, training_pairs,
                             unread_subfolders)
from ..training.loss import TEACHER_EDGES, S4FusionLoss, teacher_error
from ..training.trainer import (Trainer, TrainSettings, check_new_run, load_exported,
                                weights_path)


PROG = 's4fusion-train'
DATA_ENV = 'S4FUSION_IVIF_DATA'


def add_data_argument(parser: argparse.ArgumentParser, help_text: str,
                      required: bool = True) -> None:
    """--data, defaulting to $S4FUSION_IVIF_DATA; `required`: one of the two must name it."""
    default = os.environ.get(DATA_ENV) or None
    parser.add_argument('--data', type=pathlib.Path, default=default,
                        required=required and default is None,
                        help=f'{help_text} (default: ${DATA_ENV}, now %(default)s)')


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default, but not a None: its help says what stands in for it."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser():
    """The command-line interface."""
    defaults = TrainSettings()
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split('\n')[0], formatter_class=_DefaultsHelp)
    parser.add_argument('--preset', choices=sorted(S4FusionConfig.presets()), default='compact',
                        help='network size')
    parser.add_argument('--base', choices=BASES, default=None,
                        help='what the network\'s output is added to (default: the preset\'s): '
                             'none, or laplacian (a 4-level Laplacian-pyramid fusion)')
    parser.add_argument('--detail-gain', type=float, default=None,
                        help='gain on the Laplacian base\'s details (default: the preset\'s)')
    parser.add_argument('--base-contrast', type=float, default=None,
                        help='stretch of the Laplacian base\'s low-pass base about the image\'s '
                             'mean (default: the preset\'s)')
    add_data_argument(parser, 'the ivif folder (trains on its training split; layout in the '
                              'README, "Data and licences"), a folder with ir/ and vi/ pairs '
                              'matched by file name, or a folder of such folders (trains on all); '
                              f'required unless ${DATA_ENV} is set')
    parser.add_argument('--out', type=output_path, required=True,
                        help='output folder: weights + JSON, train_state.pt, train_log.jsonl '
                             '(and checkpoints/ with --keep-every)')
    parser.add_argument('--steps', type=int, default=defaults.steps, help='optimizer steps in all')
    parser.add_argument('--batch-size', type=int, default=defaults.batch_size,
                        help='training crops per optimizer step')
    parser.add_argument('--crop', type=int, default=defaults.crop,
                        help='square training crop side, 12k + 1')
    parser.add_argument('--min-gain', type=float, default=defaults.min_gain,
                        help='gain augmentation: each source of a crop, with probability 1/2, '
                             'is scaled by its own log-uniform gain in [MIN_GAIN, 1] (1: off)')
    parser.add_argument('--dataset-balance', type=float, default=defaults.dataset_balance,
                        help='draw a dataset of n pairs with probability proportional to '
                             'n ** (1 - BALANCE): 0 every pair alike, 1 every dataset alike '
                             '(raises the 4 MSRS night/day pairs against 134 RoadScene ones)')
    parser.add_argument('--lr', type=float, default=defaults.lr, help='peak AdamW learning rate')
    parser.add_argument('--warmup', type=int, default=None,
                        help='warm-up steps (default: 5%% of --steps, at most 500)')
    parser.add_argument('--seed', type=int, default=defaults.seed,
                        help='seed of the initial weights, the crops drawn and the augmentation')
    loss_defaults = S4FusionLoss()
    parser.add_argument('--ssim-weight', type=float, default=loss_defaults.ssim_weight,
                        help='weight of the source-weighted SSIM term')
    parser.add_argument('--l1-weight', type=float, default=loss_defaults.l1_weight,
                        help='weight of the source-weighted L1 term')
    parser.add_argument('--grad-weight', type=float, default=loss_defaults.grad_weight,
                        help='weight of the max-gradient L1 term (higher: more detail)')
    parser.add_argument('--max-intensity-weight', type=float,
                        default=loss_defaults.max_intensity_weight,
                        help='weight of an L1 term to the brighter source per pixel (SeAFusion\'s '
                             'intensity loss, not the authors\'; 0: off)')
    parser.add_argument('--device', default='auto', help='auto, cpu, cuda or cuda:N')
    parser.add_argument('--threads', type=int, default=None,
                        help='CPU threads for torch (default: torch\'s choice, one per core); '
                             '1 is often faster on a machine other jobs keep busy')
    parser.add_argument('--resume', action='store_true',
                        help='continue the run in --out from its train_state.pt')
    parser.add_argument('--stop-at', type=int, default=None,
                        help='stop (with a checkpoint) after this step; resume later to go on')
    parser.add_argument('--time-limit', type=float, default=None,
                        help='stop (with a checkpoint) after the step that passes this many '
                             'minutes of training in this session (counted once the data is '
                             'read); resume later to go on')
    parser.add_argument('--fit-schedule', action='store_true',
                        help='with --time-limit: shorten --steps (never lengthen) so that the '
                             'whole schedule, warm-up and cosine, ends within the time limit, at '
                             'the pace of steps 5-25 of this session (after a checkpoint, timed '
                             'too); the warm-up keeps its share of the steps. A run whose '
                             'schedule was fitted keeps it when resumed with the same --steps')
    parser.add_argument('--checkpoint-every', type=int, default=200,
                        help='steps between checkpoints (state and weights)')
    parser.add_argument('--keep-every', type=int, default=0,
                        help='also keep the weights of every this many steps, as '
                             'checkpoints/s4fusion_<preset>-step<step>.safetensors (+ JSON) '
                             'under --out, to choose among them on a validation split (0: keep '
                             'only the latest, which each checkpoint replaces)')
    parser.add_argument('--pretrained-features', type=pathlib.Path, default=None,
                        help='torch.export .pt2 network whose features score the sources (the '
                             'authors use ImageNet ResNet-50 stages); default: image gradients')
    parser.add_argument('--pretrained-classifier', type=pathlib.Path, default=None,
                        help='torch.export .pt2 classifier (logits) for the entropy term on the '
                             'fused image; default: no entropy term')
    parser.add_argument('--teacher', type=pathlib.Path, default=None,
                        help='checkpoint of a fusion network to distil from (with '
                             '--teacher-weight); recorded with the new weights')
    parser.add_argument('--teacher-weight', type=float, default=0.0,
                        help='weight of the L1 of image and gradients to the teacher\'s fusion')
    parser.add_argument('--teacher-edges', choices=TEACHER_EDGES, default='magnitude',
                        help='what the teacher term compares of the edges: gradient magnitudes, '
                             'or the signed x and y derivatives (which also hold the student to '
                             'the teacher\'s edge sign and orientation)')
    parser.add_argument('--init-weights', type=pathlib.Path, default=None,
                        help='start from this checkpoint of the same preset (fine-tuning); '
                             'recorded with the new weights')
    parser.add_argument('--weights-dtype', choices=sorted(STORAGE_DTYPES), default='float32',
                        help='storage of the exported weights (float16 halves the file, int8 '
                             'quantizes matrices per row and about quarters it; they load as '
                             'float32)')
    parser.add_argument('--no-progress', action='store_true', help='no progress bar')
    return parser


def deviation_note(features, classifier, data_note, teacher=None):
    """How this training differs from the authors' (recorded with the weights); ``data_note``
    says what the data was, where known (``training_data_note``)."""
    notes = ['trained by s4fusion-train; the authors released no training code or settings, so '
             'term weights, temperature, optimizer and schedule are this package\'s choices']
    if teacher is not None:
        # The JSON beside the teacher's tensors sets how it fuses (its gain, its stretch): one
        # set of tensors taught differently under two JSONs.
        _, config = read_config(teacher)
        tensors_digest, json_digest = (file_sha256(path)
                                       for path in (teacher, config_path(teacher)))
        notes.append(f'distilled from {teacher.name} (sha256 {tensors_digest}) run as its '
                     f'{config_path(teacher).name} says (sha256 {json_digest}: '
                     f'{config.describe()}, detail_gain {config.detail_gain}, base_contrast '
                     f'{config.base_contrast})')
    if features is None:
        notes.append('source weights from multi-scale image Sobel energy, not ResNet-50 features')
    if classifier is None:
        notes.append('no classifier-entropy term (no ImageNet classifier available)')
    if data_note:
        notes.append(data_note)
    return '; '.join(notes) + '.'


class AbortedAfterSaving(KeyboardInterrupt):
    """A second stop signal that came while a checkpoint was written, acted on after it."""


class GracefulStop:
    """SIGINT/SIGTERM end training after the current step, with a checkpoint; a second one
    aborts at once, except while a checkpoint is written (``saving``): then right after it, so
    the weights and their JSON always describe one step. Use it as a context manager."""

    def __init__(self):
        self.received = ''  # the first stop signal's name
        self.saving_now = False
        self.abort_after_saving = False

    def _handle(self, signum, _frame):
        if not self.received:
            self.received = signal.Signals(signum).name
            print(f'\n{self.received}: stopping after this step (again to abort without '
                  'saving)', file=sys.stderr, flush=True)
        elif self.saving_now:
            self.abort_after_saving = True
        else:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def saving(self):
        """Hold a second stop signal while the block runs; act on it after."""
        self.saving_now = True
        try:
            yield
        finally:
            self.saving_now = False
        if self.abort_after_saving:
            raise AbortedAfterSaving

    def __enter__(self):
        self.previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, *exc_info):
        for sig, old in self.previous.items():
            signal.signal(sig, old)


def main(argv=None):
    """Entry point of ``s4fusion-train``; returns the process exit status: a bad option is 2, a
    missing or unreadable data folder or checkpoint one line and 1."""
    parser = build_parser()
    args = parser.parse_args(argv)
    error = teacher_error(args.teacher is not None, args.teacher_weight, args.teacher_edges)
    if error:  # before the data is read, so a bad option is a usage error
        parser.error(f'--teacher, --teacher-weight, --teacher-edges: {error}')
    for option in ('stop_at', 'time_limit', 'checkpoint_every', 'threads'):
        value = getattr(args, option)
        if value is not None and not value > 0:
            parser.error(f'--{option.replace("_", "-")} must be > 0, got {value}')
    if args.fit_schedule and args.time_limit is None:
        parser.error('--fit-schedule needs --time-limit (the time to fit the schedule into)')
    if args.keep_every < 0:
        parser.error(f'--keep-every must be >= 0, got {args.keep_every}')
    for option in ('ssim_weight', 'l1_weight', 'grad_weight', 'max_intensity_weight'):
        value = getattr(args, option)
        if not (math.isfinite(value) and value >= 0):  # a negative term would be skipped
            parser.error(f'--{option.replace("_", "-")} must be a number >= 0, got {value}')
    terms = ('ssim_weight', 'l1_weight', 'grad_weight', 'max_intensity_weight', 'teacher_weight')
    if not any(getattr(args, term) for term in terms) and args.pretrained_classifier is None:
        # A distillation recipe without its --teacher: the loss would be 0 at every step.
        parser.error('every loss term is 0 (--ssim-weight, --l1-weight, --grad-weight, '
                     '--max-intensity-weight) and there is no --teacher: nothing to train')
    if args.warmup is not None and args.warmup < 0:
        parser.error(f'--warmup must be >= 0, got {args.warmup}')
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        device = resolve_device(args.device)
        config = model_config(args)
        settings = TrainSettings(steps=args.steps, batch_size=args.batch_size, crop=args.crop,
                                 min_gain=args.min_gain, dataset_balance=args.dataset_balance,
                                 lr=args.lr, warmup_steps=args.warmup, seed=args.seed)
    except (DeviceError, ValueError) as error:
        parser.error(str(error))
    written = weights_path(args.out, config)
    for option in ('init_weights', 'teacher'):
        path = getattr(args, option)
        if path is not None and path.resolve() in (written.resolve(),
                                                   config_path(written).resolve()):
            parser.error(f'--{option.replace("_", "-")} {path}: this run writes its weights '
                         'there, so its first checkpoint would replace them; copy them out of '
                         '--out first')
    trainer = None
    held = contextlib.ExitStack()

    def set_up():
        nonlocal trainer
        check_writable_folder(args.out)
        # Before the state is read: a second process in the folder (the same run resumed while
        # it trains, say) would interleave its log, checkpoints and temporary files with this
        # one's.
        held.enter_context(held_folder(args.out, BlockingIOError(
            f'{args.out}: another s4fusion-train is training in this folder; let it end, or stop '
            'it (Ctrl-C checkpoints), before this one starts')))
        trainer = build_trainer(args, config, settings, device)
        return 0

    # In training, a diverging loss or a failed write (a full disk) ends with one line naming
    # the cause; any other error keeps its traceback.
    def aborted(interrupt: KeyboardInterrupt) -> str:
        if isinstance(interrupt, AbortedAfterSaving):
            return (f'aborted once the checkpoint of step {trainer.step} was written to '
                    f'{args.out}, which --resume continues')
        return (f'aborted without saving; {args.out} keeps its last checkpoint, if any, which '
                '--resume continues')

    with held:
        return (run_command(PROG, set_up, (OSError, ValueError, CheckpointError))
                or run_command(PROG, lambda: run(trainer, args), (OSError, FloatingPointError),
                               aborted))


def model_config(args):
    """The configuration to train: the preset's, with --base, --detail-gain and --base-contrast
    applied."""
    config = S4FusionConfig.preset(args.preset)
    if args.base is not None:
        # without the Laplacian base there is no base to enhance
        plain = {} if args.base == 'laplacian' else dict.fromkeys(BASE_ENHANCEMENTS, 1.0)
        config = dataclasses.replace(config, base=args.base, **plain)
    chosen = {name: getattr(args, name) for name in BASE_ENHANCEMENTS
              if getattr(args, name) is not None}
    return dataclasses.replace(config, **chosen)


def build_trainer(args, config, settings, device):
    """Read the data and the networks the options name; returns the Trainer (resumed if asked)."""
    if not args.resume:  # before minutes of reading data, not after
        check_new_run(args.out)
    data_note = training_data_note(args.data)
    pairs = training_pairs(args.data)
    unread = unread_subfolders(args.data)
    if unread:
        print(f'{PROG}: warning: {len(unread)} subfolder(s) of {args.data} hold no ir/ folder '
              f'and are not read: {", ".join(p.name for p in unread[:10])}', file=sys.stderr)
    features = classifier = None
    batch_shape = (args.batch_size, 1, args.crop, args.crop)
    if args.pretrained_features is not None:
        features = load_exported(args.pretrained_features, device, 'features', batch_shape)
    if args.pretrained_classifier is not None:
        classifier = load_exported(args.pretrained_classifier, device, 'classifier', batch_shape)
    teacher = None if args.teacher is None else load_checkpoint(args.teacher, device=device).eval()
    dataset = PairFolderDataset(pairs, args.crop, args.min_gain, args.dataset_balance)
    raw = dataset.raw_count_pairs()
    if raw:
        print(f'{PROG}: warning: ' + raw_counts_warning(
            len(raw), len(pairs), raw[0].ir_path, 'train as nearly black images'),
            file=sys.stderr)
    small = dataset.smaller_than_crop()
    if small:
        side = min(small.values())
        fitting = (f'; --crop {side - (side - 1) % 12} or less crops within every pair'
                   if side >= 13 else '')
        print(f'{PROG}: warning: {len(small)} of {len(pairs)} pairs are smaller than the '
              f'{args.crop}-pixel crop on a side ({next(iter(small)).ir_path}, ...), so their '
              f'crops are filled out by mirroring their borders{fitting}', file=sys.stderr)
    trainer = Trainer(config, dataset,
                      S4FusionLoss(args.ssim_weight, args.l1_weight, args.grad_weight,
                                   feature_extractor=features, classifier=classifier,
                                   max_intensity_weight=args.max_intensity_weight,
                                   teacher=teacher, teacher_weight=args.teacher_weight,
                                   teacher_edges=args.teacher_edges), args.out,
                      settings, device,
                      deviation_note(features, classifier, data_note, args.teacher),
                      init_weights=args.init_weights,
                      weights_dtype=STORAGE_DTYPES[args.weights_dtype])
    if args.resume:
        trainer.resume()
    return trainer


def run(trainer, args):
    """Train until the end, --stop-at, --time-limit, a signal or stderr's reader leaving;
    returns the exit status."""
    fit = trainer.schedule_fit
    schedule = (f' (fitted from {fit["steps_asked"]} after step {fit["at_step"]})' if fit
                else ', to be fitted to the time limit' if args.fit_schedule else '')
    end = trainer.end_step(args.stop_at)
    print(f'{args.preset}: {trainer.model.num_parameters()} parameters, '
          f'{len(trainer.dataset.pairs)} pairs, {trainer.device.type}, steps {trainer.step} -> '
          f'{end}{schedule}', file=sys.stderr)
    if trainer.step >= end:  # resumed at its end: a finished session's command run again
        where = (f'--stop-at {args.stop_at}' if end == args.stop_at
                 else f'the end of its {end} steps')
        print(f'nothing to train: the run has reached {where} (step {trainer.step}); its '
              f'weights: {trainer.weights_path}', file=sys.stderr)
        return 0
    deadline = None if args.time_limit is None else time.monotonic() + 60 * args.time_limit
    # A stop must end with its checkpoint where the reader of the progress went with the
    # Ctrl-C (`|& tee log`): its writes fail from then on, and the run stops as for SIGTERM.
    stderr = WritesThatCannotFail(sys.stderr)
    with contextlib.redirect_stderr(stderr), GracefulStop() as stop:
        trainer.run(stop_at=args.stop_at, checkpoint_every=args.checkpoint_every,
                    keep_every=args.keep_every, progress=not args.no_progress,
                    should_stop=lambda: bool(stop.received) or stderr.reader_left or (
                        deadline is not None and time.monotonic() > deadline),
                    saving=stop.saving, fit_by=deadline if args.fit_schedule else None)
        print(f'weights: {trainer.weights_path}', file=sys.stderr)
        if stop.received:
            print(f'stopped by {stop.received} after step {trainer.step} with a checkpoint; '
                  f'continue with the same arguments and --resume', file=sys.stderr)
            return 130
        if stderr.reader_left:
            return READER_LEFT
        if trainer.step < trainer.end_step(args.stop_at):
            print(f'time limit reached after step {trainer.step}; continue with the same '
                  'arguments and --resume', file=sys.stderr)
    return 0


if __name__ == '__main__':  # python -m, set up by its package's __init__
    from ..entry_points import run_tool
    sys.exit(run_tool(main))
