"""The shipped video sample bag: what scripts/make_video_bag.py makes from the M3SVD videos."""

import subprocess
import sys

import pytest

from paths import REPO
from s4fusion_ros import bagio, settings
from s4fusion_ros.bagio import deserialize, open_bag, read_messages
from s4fusion_ros.engine import pipeline_from_params
from s4fusion_ros.messages import stamp_to_ns

SHIPPED = REPO / 's4fusion_ros' / 'data' / 'm3svd_sample'


def test_the_script_makes_the_shipped_bag_byte_for_byte(ivif_dir, tmp_path):
    videos = ivif_dir / 'm3svd' / 'videos'
    if not (videos / 'ir').is_dir():
        pytest.skip(f'M3SVD videos not found at {videos}')
    made = tmp_path / 'm3svd_sample'
    subprocess.run([sys.executable, str(REPO / 'scripts' / 'make_video_bag.py'), str(videos),
                    '--output', str(made)], check=True, capture_output=True, timeout=120)
    assert (made / 'm3svd_sample.mcap').read_bytes() == \
        (SHIPPED / 'm3svd_sample.mcap').read_bytes()


def test_the_shipped_bag_looks_like_a_robot_recording():
    with open_bag(SHIPPED) as reader:
        thermal, visible = bagio.pick_topics(bagio.image_topics(reader, SHIPPED), SHIPPED)
        span = (reader.end_time - reader.start_time) / 1e9
        pipeline = pipeline_from_params(
            {**settings.defaults(), 'sync.thermal_offset': -0.025})
        adds = {thermal.topic: pipeline.add_thermal, visible.topic: pipeline.add_visible}
        pairs = []
        for connection, _, raw in read_messages(reader, SHIPPED, adds):
            message = deserialize(SHIPPED, connection, raw)
            pairs += adds[connection.topic](message, stamp_to_ns(message.header.stamp),
                                            message.header.frame_id)
    pairs += pipeline.flush()
    assert (thermal.encoding, thermal.compressed, visible.encoding, visible.compressed) == \
        ('mono16', False, 'bgr8', True)
    assert thermal.count / span == pytest.approx(9.0, rel=0.05)
    assert visible.count / span == pytest.approx(30.0, rel=0.05)
    assert sum(path.stat().st_size for path in SHIPPED.iterdir()) < 5e6
    # With the driver delay taken out every thermal frame pairs with a visible frame exposed
    # within a visible period of it, mostly within half of one (the nearest).
    assert len(pairs) == thermal.count
    offsets = [abs(p.thermal_stamp_ns - 25_000_000 - p.visible_stamp_ns) / 1e9 for p in pairs]
    assert max(offsets) < 1 / 30 and sum(offsets) / len(offsets) < 1 / 60
    assert pairs[0].thermal.shape == pairs[0].visible_bgr.shape[:2] == (240, 320)
