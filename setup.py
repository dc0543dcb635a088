from glob import glob

from setuptools import find_packages, setup

PACKAGE = 's4fusion_ros'

setup(
    name=PACKAGE,
    version='0.1.0',
    packages=find_packages(exclude=['test']),
    # Shipped weights, the sample bag and its licence travel inside the Python package so the
    # node finds them the same way under colcon, pip and an editable install.
    package_data={PACKAGE: ['weights/*.safetensors', 'weights/*.json', 'data/*', 'data/**/*']},
    data_files=[
        ('share/ament_index/resource_index/packages', [f'resource/{PACKAGE}']),
        (f'share/{PACKAGE}', ['package.xml']),
        (f'share/{PACKAGE}/launch', glob('launch/*.launch.py')),
        (f'share/{PACKAGE}/config', glob('config/*.yaml')),
    ],
    # Runtime dependencies come from the ROS distro (package.xml) or from requirements.txt on a
    # machine without ROS; listing rclpy here would break colcon builds.
    install_requires=['setuptools'],
    # gpu: checked with mamba-ssm 2.3.2.post1 (README, GPU); ray: s4fusion-batch (Many bags).
    extras_require={'gpu': ['mamba-ssm>=2.2'], 'ray': ['ray>=2.60']},
    zip_safe=False,
    maintainer='s4fusion_ros developers',
    maintainer_email='s4fusion-ros@example.com',
    description='Thermal/RGB image fusion node with S4Fusion (selective state space model).',
    license='MIT',
    tests_require=['pytest'],
    entry_points={
        'console_scripts': [
            's4fusion_node = s4fusion_ros.ros.node:main',
            's4fusion-fuse = s4fusion_ros.tools.fuse:main',
            's4fusion-eval = s4fusion_ros.tools.evaluate:main',
            's4fusion-bag = s4fusion_ros.tools.bag:main',
            's4fusion-batch = s4fusion_ros.tools.batch:main',
            's4fusion-play = s4fusion_ros.ros.player:main',
            's4fusion-demo = s4fusion_ros.ros.demo:main',
            's4fusion-train = s4fusion_ros.tools.train:main',
            's4fusion-bench = s4fusion_ros.tools.bench:main',
            's4fusion-flood = s4fusion_ros.tools.flood:main',
        ],
    },
)
