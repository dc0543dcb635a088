"""Training S4Fusion: folder-pair dataset and data splits, the S4Fusion loss, the training loop."""

from .data import IvifSplits, Pair, PairFolderDataset, ivif_splits, pairs_in_folder
from .loss import S4FusionLoss
from .trainer import Trainer, TrainSettings, load_exported

__all__ = ['IvifSplits', 'Pair', 'PairFolderDataset', 'S4FusionLoss', 'Trainer', 'TrainSettings',
           'ivif_splits', 'load_exported', 'pairs_in_folder']
