"""The fusion-quality report: per-dataset metric tables in Markdown and an image grid.

ROS- and torch-free: it formats what `tools/evaluate.py` measured. Means leave undefined (NaN)
values out and the report counts them. "Best" and "wins" compare the values as printed, so the
bold cells and the win counts always agree with what a reader sees. The paired tables say which of
those differences of means hold up pair by pair (a bootstrap over the test pairs, in numpy: the
comparison is a few lines and needs no statistics package).
"""

import csv
import dataclasses
import io
import math

import cv2
import numpy as np

from .metrics import METRICS

LOWER_IS_BETTER = frozenset({'MSE'})
GRID_HEIGHT = 240  # pixels per grid row
GRID_LABEL = 26  # pixels of the column-title strip
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0  # fixed, so the report is a function of the scores
# With fewer clips (or independent pairs) than this, the percentile interval of the resampled
# means is little more than the range of the clips' own means (a resample of one given clip
# alone has probability k^-k for k clips: 3.7% at k = 3, above the 2.5% tail the interval cuts),
# so the verdict asks every clip to agree.
BOOTSTRAP_MIN_UNITS = 6
NOT_COMPARED = '—'  # the paired verdict where no pair has both values defined
# What a paired comparison takes an infinite per-pair difference for (PSNR where one output
# equals both sources): far beyond any metric's finite values, far from overflowing in the
# resampled sums of any number of pairs.
INFINITE_DIFFERENCE = 1e100
# Ends the generated part; the maintainers' reading (and the flicker section) below it is kept.
READING_MARKER = "<!-- The maintainers' reading of these numbers goes below."
READING_MARKER_LINE = READING_MARKER + ' s4fusion-eval keeps what is below this line. -->'

CONVENTIONS = """\
- Every method's output is first made into the image a saved PNG holds: uint8, rounded half
  up (as MATLAB's uint8); colour (the method's luminance with the visible image's chroma, as the
  node composes it) when the visible image is colour, gray otherwise. The metrics are then
  computed on the luminance Y (OpenCV YCrCb) of that image against the IR luminance and the
  visible luminance (0-255), by the same code for every method and on the same pairs. Stored
  outputs are scored as saved: the Y of a colour image composed from a method's unrounded
  luminance is mostly within 1 level of its rounded gray (more where the colour saturates), not
  equal to it (the plain average saved gray scores MI about 1.2% and Qabf 0.9% higher on MSRS-22
  than in its row here, up to 3% on a pair).
- Metric definitions: `s4fusion_ros/evaluation/metrics.py` (module docstring table), in its
  standard 0-255 convention (`evaluate_all(..., matlab_compat=False)`). MI, VIF and SSIM are sums
  over the two sources (at most 2 for SSIM), CC is their mean, MSE their mean, PSNR (dB, peak 255)
  is computed from each pair's MSE and then averaged over the pairs (so not from the table's
  mean MSE). Published tables differ by the version of Tang et al.'s MATLAB toolkit
  (Linfeng-Tang/Evaluation-for-Image-Fusion) behind them. Its 2022 version (SeAFusion's, and
  `matlab_compat=True`): SF and MSE are ours / 255 and / 255^2, PSNR ours + 48.13 dB, SD, MI and
  VIF follow uint8 arithmetic and Qabf MATLAB's rounding on [0, 1] data. Since March 2023 it
  gives SD, SF, VIF and Qabf on our scale; MSE and PSNR still differ as above, MI by its uint8
  histogram. Compare with published numbers only through the table in `metrics.py`.
- Higher is better for every metric except MSE (marked with a down arrow). The best value of each
  metric is in bold (ties: all of them). Timing (s/pair) is the fusion alone (for S4Fusion the
  engine's whole step: model, detail restoration, saliency and colour), after one untimed warm-up
  per dataset, without file reading and metrics; it is not part of the comparison."""

PAIRED_INTRO = """\
**Paired over the pairs:** per pair, ours minus the other method (signed so that positive favours
ours). W: the 95% percentile-bootstrap interval of the mean difference ({resamples} resamples of
the pairs, unless a note below says otherwise) lies above 0; L: below 0; ~: it contains 0, so the
difference of the means is within what another draw of test pairs could reverse; —: no pair has
both values defined (the metric is undefined on every pair for one of the two), so no comparison,
left out of the W / L / ~ counts. The percentage is the share of pairs on which ours is strictly
better."""
CLIPS_NOTE = """\
The pairs of this split are frames of {clips}, and frames of one clip are not independent
draws: the bootstrap resamples whole clips here."""
FEW_UNITS_NOTE = """\
With {units}, too few for a bootstrap interval (fewer than {minimum}), W here means that the mean
difference of every one of them favours ours, L that every one favours the other method, and ~
that they disagree (with one, no verdict is possible)."""
FEW_DEFINED_NOTE = """\
Where a metric is defined for both methods on fewer than {minimum} {nouns}, there is no bootstrap
interval ({listed}): W there means that the mean difference of every one of them favours ours, L
that every one favours the other method, and ~ that they disagree (with one, no verdict is
possible)."""


@dataclasses.dataclass
class MethodScores:
    """The per-pair metrics (`metrics.evaluate_all` dicts) of one method on one dataset."""

    name: str
    ours: bool
    scores: list = dataclasses.field(default_factory=list)
    seconds: float | None = 0.0  # fusion time summed over the pairs; None: stored outputs

    def mean(self, metric: str) -> float:
        """Mean over the pairs where the metric is defined (NaN if it is nowhere)."""
        values = np.array([score[metric] for score in self.scores], dtype=np.float64)
        defined = values[~np.isnan(values)]
        return float(defined.mean()) if defined.size else math.nan

    def undefined(self, metric: str) -> int:
        """Number of pairs where the metric is NaN, i.e. not defined."""
        return sum(math.isnan(score[metric]) for score in self.scores)

    def infinite(self, metric: str) -> int:
        """Number of pairs where the metric is infinite (PSNR of an output equal to both
        sources), which makes its mean infinite."""
        return sum(math.isinf(score[metric]) for score in self.scores)

    def seconds_per_pair(self) -> float | None:
        """Mean fusion time, or None for stored outputs."""
        return None if self.seconds is None else self.seconds / max(len(self.scores), 1)


@dataclasses.dataclass
class DatasetScores:
    """Every method's scores on one split."""

    name: str
    pair_names: tuple  # the pairs' file names, in the order of every method's scores
    methods: list
    validation: bool = False  # a split that weights and settings were chosen on
    metrics: tuple = METRICS  # those compared (a published table may lack some)
    description: str = ''  # a paragraph under the heading, where the table needs one
    per_pair: bool = True  # listed in the per-pair CSV (not values copied from a publication)
    # The clip each pair is a frame of, where the split is frames of clips: such frames are
    # not independent, so the paired bootstrap resamples whole clips. None: independent pairs.
    pair_clips: tuple | None = None

    def __post_init__(self):
        if self.pair_clips is not None and len(self.pair_clips) != len(self.pair_names):
            raise ValueError(f'{self.name}: {len(self.pair_clips)} clips for '
                             f'{len(self.pair_names)} pairs')

    @property
    def pairs(self) -> int:
        """Number of pairs."""
        return len(self.pair_names)


@dataclasses.dataclass
class ReportContext:
    """How the report was made: everything besides the scores, as Markdown-ready text."""

    command: str
    date: str
    environment: str  # device, threads, library versions
    weights: list  # one line per evaluated checkpoint
    skipped: list  # one line per configuration or method that could not run
    notes: list  # factual notes
    grid: str = ''  # relative link to the grid image; '' when none was written


def format_value(value: float) -> str:
    """Three decimals, one above 100 (MSE), four below 0.1 (the toolkit's SF and MSE on
    [0, 1]); 'nan' and 'inf' as such."""
    if not math.isfinite(value):
        return str(value)
    if abs(value) >= 100:
        return f'{value:.1f}'
    return f'{value:.4f}' if 0 < abs(value) < 0.1 else f'{value:.3f}'


def _shown(method: MethodScores, metric: str) -> float:
    """The value as printed, for comparisons that agree with the table."""
    return float(format_value(method.mean(metric)))


def _better(a: float, b: float, metric: str) -> bool:
    """Whether mean ``a`` beats ``b``; an undefined (NaN) mean beats nothing and is beaten by
    nothing: a method whose metric cannot be computed has not lost on it."""
    if math.isnan(a) or math.isnan(b):
        return False
    return a < b if metric in LOWER_IS_BETTER else a > b


def best_methods(dataset: DatasetScores, metric: str) -> set:
    """Names of the methods whose printed mean is the best (several on a tie; none when no
    mean is defined)."""
    shown = {m.name: _shown(m, metric) for m in dataset.methods
             if not math.isnan(_shown(m, metric))}
    best = None
    for value in shown.values():
        if best is None or _better(value, best, metric):
            best = value
    return {name for name, value in shown.items() if value == best}


def _beaten(method, rivals, metrics) -> list:
    """The ``metrics`` on which ``method``'s printed mean beats every rival's that is defined
    (none where its own is undefined or no rival's is), as the bold cells show the best."""
    beaten = []
    for metric in metrics:
        defined = [value for value in (_shown(rival, metric) for rival in rivals)
                   if not math.isnan(value)]
        if defined and all(_better(_shown(method, metric), value, metric)
                           for value in defined):
            beaten.append(metric)
    return beaten


def wins(dataset: DatasetScores) -> dict:
    """Our method name -> the metrics on which its printed mean beats every other method's
    (our other configurations are not rivals)."""
    others = [m for m in dataset.methods if not m.ours]
    return {ours.name: _beaten(ours, others, dataset.metrics)
            for ours in dataset.methods if ours.ours}


def head_to_head(dataset: DatasetScores) -> dict:
    """Our method name -> {other method name -> the metrics on which ours beats that one}."""
    others = [m for m in dataset.methods if not m.ours]
    return {ours.name: {rival.name: _beaten(ours, [rival], dataset.metrics) for rival in others}
            for ours in dataset.methods if ours.ours}


def reference_wins(dataset: DatasetScores) -> dict:
    """Each other method's name -> the metrics on which it beats every method, ours included:
    how far any single method gets towards winning most metrics."""
    return {method.name: _beaten(method, [m for m in dataset.methods if m is not method],
                                 dataset.metrics)
            for method in dataset.methods if not method.ours}


@dataclasses.dataclass(frozen=True)
class PairedComparison:
    """Ours against one rival on one metric, pair by pair.

    ``verdict``: 'W' when the 95% bootstrap interval of the mean per-pair difference (signed so
    that positive favours ours) lies above 0, 'L' when below, '~' when it contains 0 (the
    difference of the means is within what the choice of test pairs could change); with fewer
    than BOOTSTRAP_MIN_UNITS clips or pairs, 'W' or 'L' when every one's mean difference agrees;
    NOT_COMPARED where no pair has both values defined (nothing is within noise there either).
    ``share_better``: the fraction of pairs on which ours is strictly better. ``few_units``: how
    many clips (or pairs) have a defined difference where undefined values left fewer than
    BOOTSTRAP_MIN_UNITS of a split that has enough for an interval (the report notes them);
    else None.
    """

    verdict: str
    share_better: float
    few_units: int | None = dataclasses.field(default=None, compare=False)


def _units(dataset: DatasetScores) -> tuple[int, np.ndarray]:
    """(the number of independent units, the unit of each pair): clips where the pairs are frames
    of clips, else the pairs themselves."""
    clips = dataset.pair_clips or range(dataset.pairs)
    units, unit_of_pair = np.unique(np.asarray(clips), return_inverse=True)
    return len(units), unit_of_pair


def _resamples(count: int, unit_of_pair: np.ndarray) -> np.ndarray | None:
    """(BOOTSTRAP_RESAMPLES, pairs) how often each pair is in each resample of the `count` units
    (``_units``: pairs, or whole clips, a cluster bootstrap), the same for every comparison of a
    dataset; None with fewer than BOOTSTRAP_MIN_UNITS units, too few for an interval."""
    if count < BOOTSTRAP_MIN_UNITS:
        return None
    draws = np.random.default_rng(BOOTSTRAP_SEED).integers(
        0, count, size=(BOOTSTRAP_RESAMPLES, count))
    drawn = np.zeros((BOOTSTRAP_RESAMPLES, count))
    np.add.at(drawn, (np.arange(BOOTSTRAP_RESAMPLES)[:, None], draws), 1.0)
    return drawn[:, unit_of_pair]


def paired_comparison(ours: MethodScores, rival: MethodScores, metric: str,
                      unit_of_pair: np.ndarray, resamples: np.ndarray | None) -> PairedComparison:
    """Compare per-pair values; pairs where either value is undefined are left out, and so are
    units (clips, or pairs) without a defined value. Fewer than 2 units left: no verdict; fewer
    than BOOTSTRAP_MIN_UNITS: W or L where every unit's mean difference agrees; else the 95%
    interval of the means of ``resamples`` (``_resamples``)."""
    mine = np.array([score[metric] for score in ours.scores], dtype=np.float64)
    theirs = np.array([score[metric] for score in rival.scores], dtype=np.float64)
    difference = mine - theirs if metric not in LOWER_IS_BETTER else theirs - mine
    defined = ~np.isnan(difference)
    # An infinite difference outweighs every finite one, as a finite stand-in: as itself it made
    # the resampled sums NaN (0 * inf where a resample leaves its pair out), so the verdict '~'.
    difference = np.clip(difference, -INFINITE_DIFFERENCE, INFINITE_DIFFERENCE)
    if not defined.any():
        return PairedComparison(NOT_COMPARED, math.nan)
    share_better = float(np.mean(difference[defined] > 0))
    units = np.unique(unit_of_pair[defined])
    # Undefined values leaving too few of the split's units for an interval: the legend and the
    # split's notes promise one, so the verdict says that it has none.
    few_units = len(units) if resamples is not None and len(units) < BOOTSTRAP_MIN_UNITS \
        else None
    if len(units) < 2:
        return PairedComparison('~', share_better, few_units)
    if resamples is None or len(units) < BOOTSTRAP_MIN_UNITS:
        means = np.array([difference[defined & (unit_of_pair == unit)].mean() for unit in units])
        low, high = means.min(), means.max()
    else:
        # Undefined pairs weigh nothing, which keeps one resample matrix for every metric; a
        # resample of undefined pairs alone (a clip without a defined value, drawn alone) has
        # no mean.
        drawn = resamples @ defined
        means = (resamples @ np.where(defined, difference, 0.0))[drawn > 0] / drawn[drawn > 0]
        low, high = np.quantile(means, [0.025, 0.975])
    verdict = 'W' if low > 0 else 'L' if high < 0 else '~'
    return PairedComparison(verdict, share_better, few_units)


def paired_comparisons(dataset: DatasetScores) -> dict:
    """Our method name -> {rival name -> {metric -> PairedComparison}}."""
    unpaired = [m.name for m in dataset.methods if len(m.scores) != dataset.pairs]
    if unpaired:
        raise ValueError(f'{dataset.name}: {", ".join(unpaired)} not scored on each of the '
                         f'{dataset.pairs} pairs; a paired comparison needs every pair')
    count, unit_of_pair = _units(dataset)
    resamples = _resamples(count, unit_of_pair)
    others = [m for m in dataset.methods if not m.ours]
    return {ours.name: {rival.name: {
        metric: paired_comparison(ours, rival, metric, unit_of_pair, resamples)
        for metric in dataset.metrics} for rival in others}
        for ours in dataset.methods if ours.ours}


def paired_tables(dataset: DatasetScores) -> list:
    """Markdown: per configuration of ours, a row per rival with each metric's paired verdict
    and share of pairs won, and the counts of W, L and ~ (NOT_COMPARED is none of them); then a
    note naming the comparisons whose defined values left too few units for an interval."""
    lines, few = [], []
    noun = 'clip' if dataset.pair_clips else 'pair'
    for name, rivals in paired_comparisons(dataset).items():
        lines += [f'| {name} vs | ' + ' | '.join(dataset.metrics) + ' | W / L / ~ |',
                  '|---|' + ':---:|' * (len(dataset.metrics) + 1)]
        for rival, compared in rivals.items():
            cells = [f'{c.verdict} {c.share_better:.0%}' if math.isfinite(c.share_better)
                     else c.verdict for c in compared.values()]
            counts = ' / '.join(str(sum(c.verdict == v for c in compared.values()))
                                for v in 'WL~')
            lines.append(f'| {rival} | ' + ' | '.join(cells) + f' | {counts} |')
            few += [f'{name} vs {rival}: {metric} ({_count(c.few_units, noun)})'
                    for metric, c in compared.items() if c.few_units is not None]
        lines.append('')
    if few:
        lines += [FEW_DEFINED_NOTE.format(minimum=BOOTSTRAP_MIN_UNITS, nouns=noun + 's',
                                          listed='; '.join(few)), '']
    return lines


def metric_table(dataset: DatasetScores) -> list:
    """Markdown table lines: rows = methods, columns = metric means and time per pair."""
    titles = [f'{m} {"↓" if m in LOWER_IS_BETTER else "↑"}' for m in dataset.metrics]
    timed = any(method.seconds is not None for method in dataset.methods)  # else no column
    lines = ['| Method | ' + ' | '.join(titles) + (' | s/pair |' if timed else ' |'),
             '|---|' + '---:|' * (len(dataset.metrics) + timed)]
    best = {metric: best_methods(dataset, metric) for metric in dataset.metrics}
    for method in dataset.methods:
        cells = []
        for metric in dataset.metrics:
            text = format_value(method.mean(metric))
            cells.append(f'**{text}**' if method.name in best[metric] else text)
        seconds = method.seconds_per_pair()
        if timed:
            cells.append('stored' if seconds is None else f'{seconds:.3f}')
        lines.append(f'| {method.name} | ' + ' | '.join(cells) + ' |')
    return lines


def wins_lines(dataset: DatasetScores) -> list:
    """Per configuration of ours: on how many metrics it beats every other method at once, and
    on how many it beats each one head to head (more than half of them: "most")."""
    others = ', '.join(m.name for m in dataset.methods if not m.ours)
    if not others:
        return ['No other method was evaluated on this dataset.']
    lines = []
    for name, won in wins(dataset).items():
        listed = f': {", ".join(won)}' if won else ''
        lines.append(f'- {name} beats every other method ({others}) on {len(won)} of '
                     f'{len(dataset.metrics)} metrics{listed}.')
    for name, rivals in head_to_head(dataset).items():
        counts = ', '.join(f'{rival} {len(won)}' for rival, won in rivals.items())
        most = all(2 * len(won) > len(dataset.metrics) for won in rivals.values())
        lines.append(f'- {name} head to head, the metrics of {len(dataset.metrics)} on which it '
                     f'beats each other method: {counts} ({"most" if most else "not most"} '
                     'against every one).')
    if not lines:
        return ['No configuration of ours was evaluated.']
    references = ', '.join(f'{name} {len(won)}' for name, won in reference_wins(dataset).items())
    lines.append(f'- For reference, the metrics on which each other method beats every method '
                 f'(ours included): {references}.')
    return lines


def per_pair_csv(datasets: list) -> str:
    """Every method's metrics on every pair as CSV (dataset, pair, method, then METRICS), at
    full float precision (repr, so a value reads back exactly): the numbers behind the tables,
    for readers who want their own analysis."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator='\n')
    writer.writerow(['dataset', 'pair', 'method', *METRICS])
    for dataset in (dataset for dataset in datasets if dataset.per_pair):
        for method in dataset.methods:
            for pair, score in zip(dataset.pair_names, method.scores, strict=True):
                writer.writerow([dataset.name, pair, method.name,
                                 *(repr(float(score[metric])) for metric in METRICS)])
    return buffer.getvalue()


def undefined_notes(datasets: list) -> list:
    """Factual notes on metrics left undefined (NaN) or infinite for some pairs."""
    notes = []
    for dataset in datasets:
        for method in dataset.methods:
            for metric in dataset.metrics:
                count = method.undefined(metric)
                if count:
                    notes.append(f'{dataset.name}, {method.name}: {metric} is undefined on '
                                 f'{count} of {len(method.scores)} pairs; its mean leaves '
                                 f'them out.')
                count = method.infinite(metric)
                if count:
                    notes.append(f'{dataset.name}, {method.name}: {metric} is infinite on '
                                 f'{count} of {len(method.scores)} pairs (its output equals '
                                 'both sources there), and so is its mean.')
    return notes


def _count(number: int, noun: str) -> str:
    """'1 pair', '2 pairs'."""
    return f'{number} {noun}' + ('' if number == 1 else 's')


def _units_notes(dataset: DatasetScores) -> list:
    """Markdown paragraphs on what the paired verdicts of this split resample, where it is not
    simply its pairs."""
    count, _ = _units(dataset)
    noun = 'clip' if dataset.pair_clips else 'pair'
    notes = [CLIPS_NOTE.format(clips=_count(count, 'clip')), ''] if dataset.pair_clips else []
    if count < BOOTSTRAP_MIN_UNITS:
        notes += [FEW_UNITS_NOTE.format(units=_count(count, noun), minimum=BOOTSTRAP_MIN_UNITS),
                  '']
    return notes


def render(datasets: list, context: ReportContext) -> str:
    """The whole report as Markdown."""
    lines = ['# Fusion quality', '',
             'Generated by `s4fusion-eval`; do not edit the tables by hand, run it again.', '',
             '## How it was generated', '',
             f'- Command: `{context.command}`', f'- Date: {context.date}',
             f'- Environment: {context.environment}', '- Weights:']
    lines += [f'  - {line}' for line in context.weights or ['none evaluated']]
    lines += [f'- Skipped: {line}' for line in context.skipped]
    lines += ['', '## Conventions', '', CONVENTIONS, '']
    for dataset in datasets:
        role = ', validation split' if dataset.validation else ''
        lines += [f'## {dataset.name} ({_count(dataset.pairs, "pair")}{role})', '',
                  *([dataset.description, ''] if dataset.description else []),
                  *metric_table(dataset), '', '**Wins:**', '', *wins_lines(dataset), '']
        if any(m.ours for m in dataset.methods) and any(not m.ours for m in dataset.methods):
            lines += [PAIRED_INTRO.format(resamples=f'{BOOTSTRAP_RESAMPLES:,}'), '',
                      *_units_notes(dataset), *paired_tables(dataset)]
    if context.grid:
        lines += ['## Examples', '',
                  'IR, visible, fused and saliency, one pair per dataset:', '',
                  f'![IR / VI / fused / saliency]({context.grid})', '']
    lines += ['## Notes', '', *[f'- {note}' for note in
                                context.notes + undefined_notes(datasets)],
              '', READING_MARKER_LINE, '']
    return '\n'.join(lines)


def below_reading_marker(text: str) -> str | None:
    """What an earlier report has below its reading marker (the flicker section and the
    maintainers' reading), to keep; None when it has no marker."""
    _, marker, tail = text.partition(READING_MARKER)
    return tail.partition('-->')[2] if marker else None


def _to_bgr(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR) if image.ndim == 2 else image


def _fit(image: np.ndarray, height: int) -> np.ndarray:
    """Resize to `height` keeping the aspect ratio, as BGR."""
    width = max(1, round(image.shape[1] * height / image.shape[0]))
    return cv2.resize(_to_bgr(image), (width, height), interpolation=cv2.INTER_AREA)


def _label(image: np.ndarray, text: str, origin: tuple) -> None:
    """Draw ``text`` outlined. The Hershey font has ASCII only, and a file name that is not
    UTF-8 (held as surrogates) crashed OpenCV: any other character is drawn as '?'."""
    text = text.encode('ascii', 'replace').decode('ascii')
    for color, thickness in (((0, 0, 0), 3), ((255, 255, 255), 1)):
        cv2.putText(image, text, origin, cv2.FONT_HERSHEY_SIMPLEX, 0.5, color, thickness,
                    cv2.LINE_AA)


def make_grid(rows: list, titles: list, height: int = GRID_HEIGHT) -> np.ndarray:
    """Tile rows of uint8 images (gray or BGR) into one BGR image with column titles.

    ``rows`` holds (label, images) with one image per title; every cell is scaled to ``height``
    and a column is as wide as its widest cell. The label is written in each row's first cell.
    """
    cells = [[_fit(image, height) for image in images] for _, images in rows]
    widths = [max(row[col].shape[1] for row in cells) for col in range(len(titles))]
    grid = np.zeros((GRID_LABEL + height * len(rows), sum(widths), 3), np.uint8)
    offsets = np.concatenate([[0], np.cumsum(widths)])
    for col, title in enumerate(titles):
        _label(grid, title, (int(offsets[col]) + 6, GRID_LABEL - 8))
    for index, ((label, _), row) in enumerate(zip(rows, cells)):
        top = GRID_LABEL + index * height
        for col, cell in enumerate(row):
            grid[top:top + height, offsets[col]:offsets[col] + cell.shape[1]] = cell
        _label(grid, label, (6, top + 18))
    return grid
