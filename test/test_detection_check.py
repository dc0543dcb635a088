"""scripts/detection_check.py without its detector (TensorFlow is not a dependency): the pseudo
labels, the matching, recall and AP50 on boxes whose answers are known, and the rewrite of the
detector's fused TensorFlow.js nodes."""

import base64
import importlib.util
import math

import numpy as np
import pytest

from paths import REPO

spec = importlib.util.spec_from_file_location('detection_check',
                                              REPO / 'scripts' / 'detection_check.py')
check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check)

PERSON, CAR, CHAIR = 0, 2, 56


def boxes(*rows):
    return np.array(rows, np.float32).reshape(-1, 6)


def test_pseudo_labels_merge_what_both_passes_find_once():
    visible = boxes([0, 0, 10, 10, 0.9, CAR], [50, 50, 60, 80, 0.35, PERSON],
                    [0, 0, 5, 5, 0.99, CHAIR])  # below the score; not a road class
    infrared = boxes([1, 0, 11, 10, 0.6, CAR],  # the visible pass's car: merged into it
                     [0, 0, 10, 10, 0.8, PERSON],  # another class on the same spot: kept
                     [50, 50, 60, 80, 0.7, PERSON])  # the person the visible pass was unsure of
    labels = check.pseudo_labels([visible, infrared], label_score=0.4)
    np.testing.assert_allclose(sorted(map(tuple, labels.tolist())), [
        (0, 0, 10, 10, 0.8, PERSON), (0, 0, 10, 10, 0.9, CAR), (50, 50, 60, 80, 0.7, PERSON)],
        rtol=1e-6)


def test_a_box_finds_one_label_of_its_class_and_a_label_is_found_once():
    labels = boxes([0, 0, 10, 10, 1, CAR], [20, 0, 30, 10, 1, CAR], [40, 0, 50, 10, 1, PERSON])
    detected = boxes([0, 0, 10, 10, 0.9, CAR], [1, 0, 11, 10, 0.8, CAR],  # the same car twice
                     [40, 0, 50, 10, 0.9, CAR],  # the person's place, the wrong class
                     [20, 0, 26, 10, 0.9, CAR])  # IoU 0.6 with the second car
    assert check.matches(detected, labels).tolist() == [True, False, False, True]
    assert check.found(detected, labels, score=0.3) == 2
    assert check.found(detected, labels, score=0.85) == 2  # the 0.8 box matched nothing
    assert check.found(detected[[0, 3]], labels, score=0.95) == 0


def test_ap50_of_known_rankings():
    labels = [boxes([0, 0, 10, 10, 1, CAR]), boxes([0, 0, 10, 10, 1, CAR])]
    perfect = [boxes([0, 0, 10, 10, 0.9, CAR]), boxes([0, 0, 10, 10, 0.8, CAR])]
    assert check.ap50(perfect, labels) == pytest.approx(1.0)
    # A false box ranked first, then both cars: precision 1/2 up to recall 1/2, 2/3 after it.
    ranked = [boxes([0, 0, 10, 10, 0.9, CAR], [50, 50, 60, 60, 0.95, CAR]),
              boxes([0, 0, 10, 10, 0.8, CAR])]
    assert check.ap50(ranked, labels) == pytest.approx(2 / 3)
    half = [boxes([0, 0, 10, 10, 0.9, CAR]), boxes()]  # one car never found
    assert check.ap50(half, labels) == pytest.approx(51 / 101)  # recall points 0 to 0.5
    # Averaged over the classes labelled: a person found by nothing counts 0.
    with_person = [np.concatenate([labels[0], boxes([20, 20, 30, 40, 1, PERSON])]), labels[1]]
    assert check.ap50(perfect, with_person) == pytest.approx(0.5)
    assert math.isnan(check.ap50(perfect, [boxes(), boxes()]))


def test_bootstrap_resamples_clips_and_gives_no_interval_for_too_few():
    found = np.array([1, 1, 0, 2, 1, 1])  # fewer than the labels on every pair
    labels = np.array([2, 2, 1, 3, 2, 2])
    pairs = np.arange(6)
    assert check.bootstrap_interval(found, found, labels, pairs, resamples=200) == (0.0, 0.0)
    low, high = check.bootstrap_interval(labels, found, labels, pairs, resamples=2000)
    assert 0 < low <= high <= 1
    # Two clips of three frames: too few units for an interval, as the report's paired tables.
    assert check.bootstrap_interval(labels, found, labels, np.array(list('aaabbb'))) is None
    # Whole clips resampled: the six frames of one clip, where a alone finds its label, are one
    # draw (missed by a resample with probability (6/7)^7), not six independent ones.
    clips = np.array(list('abcdef' + 'g' * 6))
    a, b, one = np.ones(12), np.repeat([1.0, 0.0], 6), np.ones(12)
    assert check.bootstrap_interval(a, b, one, np.arange(12), resamples=4000)[0] > 0
    assert check.bootstrap_interval(a, b, one, clips, resamples=4000)[0] == 0


def test_clip_units_come_from_the_saved_clips_table(tmp_path):
    (tmp_path / 'clips.csv').write_text('pair,clip\na_0000.png,a\na_0002.png,a\n')
    names = ['a_0000.png', 'a_0002.png', 'b.png']
    assert check.clip_units(tmp_path, names).tolist() == ['a', 'a', 'b.png']
    assert check.clip_units(tmp_path / 'none', names).tolist() == names


def fused_node(name, op, ops, inputs=('x', 'w', 'b')):
    return {'name': name, 'op': op, 'input': list(inputs),
            'attr': {'T': {'type': 'DT_FLOAT'}, 'data_format': {'s': 'TkhXQw=='},
                     'strides': {'list': {'i': ['1', '1', '1', '1']}}, 'num_args': {'i': '1'},
                     'use_cudnn_on_gpu': {'b': True}, 'epsilon': {'f': 0},
                     'fused_ops': {'list': {'s': [base64.b64encode(o.encode()).decode()
                                                  for o in ops]}}}}


def test_fused_nodes_become_convolution_bias_and_activation_under_the_same_output_name():
    other = {'name': 'y', 'op': 'Relu6', 'input': ['a'], 'attr': {}}
    nodes = check.unfused([fused_node('a', '_FusedConv2D', ['BiasAdd']),
                           fused_node('d', 'FusedDepthwiseConv2dNative', ['BiasAdd', 'Relu']),
                           other])
    assert [(n['name'], n['op'], n['input']) for n in nodes] == [
        ('a/conv', 'Conv2D', ['x', 'w']), ('a', 'BiasAdd', ['a/conv', 'b']),
        ('d/conv', 'DepthwiseConv2dNative', ['x', 'w']),
        ('d/bias_add', 'BiasAdd', ['d/conv', 'b']), ('d', 'Relu', ['d/bias_add']),
        ('y', 'Relu6', ['a'])]
    assert set(nodes[0]['attr']) == {'T', 'data_format', 'strides', 'use_cudnn_on_gpu'}
    assert 'use_cudnn_on_gpu' not in nodes[2]['attr']  # the depthwise op has no such attribute
    with pytest.raises(ValueError, match='FusedBatchNorm'):
        check.unfused([fused_node('e', '_FusedConv2D', ['FusedBatchNorm'])])


def test_a_folder_without_saved_splits_is_named_before_any_detector_loads(tmp_path, capsys):
    model = tmp_path / 'centernet.json'  # never read: TensorFlow is not installed here
    assert check.main(['--model', str(model), '--saved', str(tmp_path)]) == 1
    assert f'{tmp_path}: no <split>/fused/' in capsys.readouterr().err
