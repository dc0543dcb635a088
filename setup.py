from glob import glob

from setuptools import find_packages, setup
from setuptools.command.develop import develop

PACKAGE = 's4fusion_ros'
# colcon --symlink-install runs `setup.py develop`: its executables belong in lib/<package>, where
# ros2 run and launch_ros look (setup.cfg's [install] does this for a plain colcon build). Since
# setuptools 80 `develop` is a wrapper around `pip install -e` without this option, and setting it
# in setup.cfg broke every editable install there ("command 'develop' has no such option").
DEVELOP_OPTIONS = ({'script_dir': f'$base/lib/{PACKAGE}'}
                   if any(option[0] == 'script-dir=' for option in develop.user_options) else {})

setup(
    name=PACKAGE,
    version='0.1.0',
    packages=find_packages(exclude=['test']),
    # Shipped weights, the sample bag and its licence travel inside the Python package so the
    # node finds them the same way under colcon, pip and an editable install.
    package_data={PACKAGE: ['weights/*.safetensors', 'weights/*.json', 'data/*', 'data/**/*']},
    data_files=[
        ('share/ament_index/resource_index/packages', [f'resource/{PACKAGE}']),
        (f'share/{PACKAGE}', ['package.xml', 'LICENSE']),
        (f'share/{PACKAGE}/launch', glob('launch/*.launch.py')),
        # The Fast DDS profile here too, for other processes that publish images (README).
        (f'share/{PACKAGE}/config',
         glob('config/*.yaml') + [f'{PACKAGE}/data/fastdds_profile.xml']),
    ],
    # Runtime dependencies come from the ROS distro (package.xml) or from requirements.txt on a
    # machine without ROS; listing rclpy here would break colcon builds.
    install_requires=['setuptools'],
    python_requires='>=3.11',  # enum.StrEnum; the distros it targets (Jazzy, Kilted) have 3.12
    extras_require={
        'gpu': ['mamba-ssm>=2.2'],  # checked with 2.3.2.post1 (README, GPU)
        'ray': ['ray>=2.60'],  # s4fusion-batch (docs/batch.md)
        # colcon test runs pytest when this extra names it (setuptools >= 72 ignores
        # tests_require); pytest below 9 for launch_testing's plugin (requirements.txt).
        'test': ['pytest<9', 'hypothesis', 'pycodestyle'],
    },
    options={'develop': DEVELOP_OPTIONS},
    zip_safe=False,
    maintainer='s4fusion_ros developers',
    maintainer_email='s4fusion-ros@example.com',
    description='Thermal/RGB image fusion node with S4Fusion (selective state space model).',
    license='MIT',
    entry_points={
        'console_scripts': [
            's4fusion_node = s4fusion_ros.ros.run_node:main',
            's4fusion-fuse = s4fusion_ros.entry_points:fuse',
            's4fusion-eval = s4fusion_ros.entry_points:evaluate',
            's4fusion-bag = s4fusion_ros.entry_points:bag',
            's4fusion-batch = s4fusion_ros.entry_points:batch',
            's4fusion-play = s4fusion_ros.entry_points:play',
            's4fusion-demo = s4fusion_ros.entry_points:demo',
            's4fusion-train = s4fusion_ros.entry_points:train',
            's4fusion-bench = s4fusion_ros.entry_points:bench',
            's4fusion-flood = s4fusion_ros.entry_points:flood',
        ],
    },
)
