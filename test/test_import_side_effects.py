"""Importing the package leaves the host process as it was (only its commands set it up), and
needs no ROS outside s4fusion_ros.ros."""

import json
import os
import subprocess
import sys

import cv2
import numpy as np

from s4fusion_ros.imaging.limits import MAX_SIDE

PROBE = '''
import json, os, sys
before = dict(os.environ)
import s4fusion_ros
import s4fusion_ros.model.scan_numba
import s4fusion_ros.ros
import s4fusion_ros.tools
import numba
changed = {k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k)}
print(json.dumps({'changed': sorted(changed), 'numba_cache_dir': numba.config.CACHE_DIR}))
'''


def _probe(env: dict) -> dict:
    done = subprocess.run([sys.executable, '-c', PROBE], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_importing_the_package_changes_no_environment_variable():
    env = {k: v for k, v in os.environ.items()
           if k not in ('OMP_WAIT_POLICY', 'NUMBA_CACHE_DIR')}
    result = _probe(env)
    assert result['changed'] == []
    assert result['numba_cache_dir'] == ''  # numba's own default, not one set by the import


def test_entry_points_set_up_the_process():
    script = ('import os; from s4fusion_ros.entry_points import configure_process; '
              'configure_process(); print(os.environ["OMP_WAIT_POLICY"], '
              'os.environ["NUMBA_CACHE_DIR"], os.environ["OPENCV_IO_MAX_IMAGE_WIDTH"], '
              'os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"])')
    env = {**os.environ, 'NUMBA_CACHE_DIR': '/tmp/chosen-by-the-user',
           'OPENCV_IO_MAX_IMAGE_PIXELS': '1000'}
    for name in ('OMP_WAIT_POLICY', 'OPENCV_IO_MAX_IMAGE_WIDTH'):
        env.pop(name, None)
    done = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.stdout.split() == ['PASSIVE', '/tmp/chosen-by-the-user', str(1 << 15),
                                   '1000'], done.stderr


def test_python_m_sets_up_a_tool_process_as_its_console_command(tmp_path):
    # `python -m s4fusion_ros.tools.fuse` used to run without OpenCV's limits: it decoded and
    # fused an image wider than MAX_SIDE that s4fusion-fuse refuses from its header.
    for role, channels in (('ir', ()), ('vi', (3,))):
        (tmp_path / role).mkdir()
        cv2.imwrite(str(tmp_path / role / 'a.png'), np.zeros((2, MAX_SIDE + 1, *channels),
                                                             np.uint8))
    env = {k: v for k, v in os.environ.items() if not k.startswith('OPENCV_IO_MAX_IMAGE')}
    done = subprocess.run([sys.executable, '-m', 's4fusion_ros.tools.fuse', '--ir',
                           str(tmp_path / 'ir'), '--vi', str(tmp_path / 'vi'), '--out',
                           str(tmp_path / 'out'), '--device', 'cpu'],
                          capture_output=True, text=True, env=env, timeout=600)
    assert 'a.png: cannot read it' in done.stderr, done.stderr
    assert 'fused 0 of 1 pairs' in done.stderr, done.stderr


def test_an_undecodable_image_leaves_no_opencv_warning_in_a_tool_process():
    # A node fed truncated PNGs logged OpenCV's "[ WARN:...] grfmt_png.cpp ... PNG input
    # buffer is incomplete" for every frame, past its own rate-limited line.
    script = ('from s4fusion_ros.entry_points import configure_process; configure_process()\n'
              'import cv2, numpy as np\n'
              'from s4fusion_ros.imaging.encodings import ImageDecodeError, RawCompressedImage, '
              'decode_thermal_info\n'
              'ramp = (20000 + 10 * np.arange(160) + np.zeros((120, 1))).astype(np.uint16)\n'
              'data = cv2.imencode(".png", ramp)[1].tobytes()\n'
              'try:\n'
              '    decode_thermal_info(RawCompressedImage(format="png", data=data[:6000]))\n'
              'except ImageDecodeError as error:\n'
              '    print(error)\n')
    env = {name: value for name, value in os.environ.items() if name != 'OPENCV_LOG_LEVEL'}
    done = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                          env=env, timeout=120)
    assert "compressed 'png' image: cannot decode" in done.stdout, done.stderr
    assert 'WARN' not in done.stderr, done.stderr


ROS_FREE_PROBE = '''
import importlib, importlib.abc, pathlib, sys
import s4fusion_ros

ROS = {'rclpy', 'rosidl_runtime_py', 'sensor_msgs', 'std_msgs', 'diagnostic_msgs',
       'builtin_interfaces', 'rcl_interfaces', 'rosgraph_msgs', 'message_filters', 'cv_bridge',
       'launch', 'launch_ros', 'ament_index_python'}


class NoRos(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ROS:
            raise ImportError(f'{name} is ROS')


sys.meta_path.insert(0, NoRos())
root = pathlib.Path(s4fusion_ros.__file__).parent
for path in sorted(root.rglob('*.py')):
    parts = path.relative_to(root).with_suffix('').parts
    if parts[0] != 'ros':
        importlib.import_module('.'.join(('s4fusion_ros', *parts)).removesuffix('.__init__'))
'''


def test_every_module_outside_ros_imports_without_ros():
    # The architecture's rule: the core and the offline tools run where no ROS 2 is installed.
    done = subprocess.run([sys.executable, '-c', ROS_FREE_PROBE], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def test_loading_the_weights_needs_no_compiler_stack(tmp_path):
    # The meta-device shape check ran random and *_like ops through torch's Python references,
    # which imported torch._dynamo and sympy (0.8 s of every node start) and left a
    # torchinductor_<user> folder in the temporary directory.
    code = ('import sys; from s4fusion_ros.model import load_checkpoint, shipped_weights\n'
            'load_checkpoint(shipped_weights("authors"))\n'
            'print(sorted({"torch._dynamo", "sympy"} & set(sys.modules)))\n')
    done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          env={**os.environ, 'TMPDIR': str(tmp_path)}, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == '[]' and not list(tmp_path.iterdir())


def test_the_batch_progress_actor_imports_no_torch():
    # s4fusion-batch's progress actor runs in a Ray worker of its own at every run: a module
    # importing torch there cost about 2 s of CPU, and the driver waited for it at the run's end.
    code = ('import sys; from s4fusion_ros.batch.progress import Progress\n'
            'print(sorted({"torch", "ray", "rclpy"} & set(sys.modules)))\n')
    done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == '[]'
