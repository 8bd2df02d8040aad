"""Data of your own: a function returning (train, test), each (images, labels). Images are uint8
or floats in [0, 1], N x C x H x W. Replace the body with your own loading; this one takes MNIST
from the data folder (`--data-dir` or $ROBUSTPRUNE_DATA, passed as `data_dir` because the function
asks for it) so the example runs anywhere the tests run."""

from robustprune.data import load_dataset


def digits(data_dir=None, n_train: int = 10000, n_test: int = 2000):
    ds = load_dataset("mnist", data_dir, download=False)
    return (ds.x_train[:n_train], ds.y_train[:n_train]), (ds.x_test[:n_test], ds.y_test[:n_test])
