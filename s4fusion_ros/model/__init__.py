"""The S4Fusion network (PyTorch, ROS-free), its checkpoints and selective-scan backends."""

from .checkpoint import (CheckpointError, convert_authors_state_dict, load_checkpoint,
                         save_checkpoint, shipped_weights)
from .s4fusion import S4Fusion, S4FusionConfig

__all__ = ['CheckpointError', 'S4Fusion', 'S4FusionConfig', 'convert_authors_state_dict',
           'load_checkpoint', 'save_checkpoint', 'shipped_weights']
