"""Where the tests find the repository and the shared image data."""

import os
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]
IVIF = pathlib.Path(os.environ.get('S4FUSION_IVIF_DATA', REPO.parent / 'shared' / 'data' / 'ivif'))
