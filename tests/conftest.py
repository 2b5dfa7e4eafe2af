import pytest
import torch

from fastquant.data import load_dataset, stack


def pytest_configure(config):
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny():
    """vit-tiny-fmnist with its data config and spec."""
    from fastquant.models import load_model

    return load_model("vit-tiny-fmnist")


@pytest.fixture(scope="session")
def tiny_data(tiny):
    """(calibration images, test dataset) for vit-tiny-fmnist."""
    _, dcfg, _ = tiny
    train = load_dataset("fmnist", "train", dcfg)
    test = load_dataset("fmnist", "test", dcfg)
    calib, _ = stack(train, range(64))
    return calib, test


@pytest.fixture()
def tmp_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path
