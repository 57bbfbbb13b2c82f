"""Shared test set-up: one torch thread, no network, caches in temporary folders."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CLIPCL_CACHE", str(tmp_path_factory.mktemp("feature-cache")))


@pytest.fixture(scope="session")
def tiny_config_path(tmp_path_factory):
    """A tiny open_clip architecture as a JSON config file, as a user would write one."""
    from clipcl.models.tiny import write_tiny_open_clip_config

    return str(write_tiny_open_clip_config(tmp_path_factory.mktemp("tiny-model")))


@pytest.fixture
def tiny_run_config(tiny_config_path, tmp_path):
    """A 3-task multi-domain run of the tiny model on synthetic data; a function to vary it."""
    from clipcl.config import RunConfig, from_dict

    def make(strategy=None, **sections):
        data = {
            "model": {"backend": "open_clip", "name": tiny_config_path},
            "stream": {"protocol": "multi_domain", "datasets": ["synthetic-0", "synthetic-1", "synthetic-2"],
                       "test_samples_per_task": 60},
            "strategy": strategy or {"name": "finetune"},
            "train": {"batch_size": 16, "max_steps_per_task": 4, "lr": 1e-3},
            "eval": {"batch_size": 32, "cache_dir": ""},
            "seed": 0,
            "output_dir": str(tmp_path / "run"),
        }
        for section, values in sections.items():
            if isinstance(values, dict):
                data.setdefault(section, {}).update(values)
            else:
                data[section] = values
        return from_dict(RunConfig, data)

    return make
