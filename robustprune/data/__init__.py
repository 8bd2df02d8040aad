from robustprune.data import cifar, imagefolder, mnist  # noqa: F401  (register the datasets)
from robustprune.data.base import DATASETS, ImageDataset, load_dataset, resolve_data_dir  # noqa: F401
from robustprune.data.regimes import REGIMES  # noqa: F401
