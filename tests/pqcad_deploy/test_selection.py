"""Density-and-diversity selection of calibration samples."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pqcad_deploy.calibration.selection import density_diversity_indices, select_calibration
from pqcad_deploy.errors import ConfigError


def _clusters():
    rng = np.random.default_rng(0)
    big = rng.normal(0.0, 0.3, size=(150, 4))           # the main mode
    small = rng.normal(5.0, 0.3, size=(30, 4))          # a second, smaller mode
    outliers = rng.uniform(20, 30, size=(3, 4))         # three isolated points
    return np.concatenate([big, small, outliers])


def test_density_weighted_picks_cover_both_modes_and_skip_outliers():
    f = _clusters()
    picked = density_diversity_indices(f, 12)
    assert len(set(picked.tolist())) == 12
    assert any(i < 150 for i in picked) and any(150 <= i < 180 for i in picked)
    assert not any(i >= 180 for i in picked)


def test_pure_kcenter_takes_the_outliers():
    f = _clusters()
    kcenter = density_diversity_indices(f, 6, gamma=0.0)
    assert sum(i >= 180 for i in kcenter) == 3


def test_deterministic_and_validated():
    f = _clusters()
    assert np.array_equal(density_diversity_indices(f, 8), density_diversity_indices(f, 8))
    with pytest.raises(ConfigError, match="cannot select"):
        density_diversity_indices(f, 0)
    with pytest.raises(ConfigError, match="cannot select 500"):
        density_diversity_indices(f, 500)
    with pytest.raises(ConfigError, match="gamma"):
        density_diversity_indices(f, 3, gamma=-1.0)


def test_select_calibration_on_a_real_unet(small_unet_dir):
    from pqcad_deploy.calibration.trajectories import collect_trajectory_calibration
    from pqcad_deploy.schedule import make_ddim_scheduler
    from pqcad_deploy.config import CalibrationConfig
    from pqcad_deploy.models import load_model

    loaded = load_model(str(small_unet_dir))
    cal = collect_trajectory_calibration(loaded.unet, make_ddim_scheduler(loaded.scheduler_config, 10), (1, 32, 32),
                                         CalibrationConfig(num_trajectories=4, timesteps_kept=10, batch_size=4),
                                         seed=0, progress=False)
    sub = select_calibration(loaded.unet, cal, 12, batch_size=20)
    assert len(sub) == 12 and sub.description["candidates"] == 40
    # every selected pair is one of the candidates, none twice
    keys = {(float(t), x.sum().item()) for x, t in zip(cal.x, cal.t)}
    picked = [(float(t), x.sum().item()) for x, t in zip(sub.x, sub.t)]
    assert set(picked) <= keys and len(set(picked)) == 12
    # more than one timestep represented
    assert len(set(sub.t.tolist())) > 1


# ----------------------------------------------------------------------------- C_QC with a selection

def _qc(unet_dir, seed=0, **options):
    from pqcad_deploy.calibration.qc import collect_qc_calibration
    from pqcad_deploy.config import CalibrationConfig
    from pqcad_deploy.models import load_model

    loaded = load_model(str(unet_dir))
    config = CalibrationConfig(num_trajectories=2, timesteps_kept=5, batch_size=4, **options)
    return collect_qc_calibration(loaded.unet, loaded.scheduler_config, (1, 32, 32), 10, config, seed=seed,
                                  progress=False)


@pytest.mark.parametrize("sampling", ["uniform", "normal"])
def test_qc_selection_keeps_the_requested_size_deterministically(small_unet_dir, sampling):
    plain = _qc(small_unet_dir, timestep_sampling=sampling)
    picked = _qc(small_unet_dir, timestep_sampling=sampling, selection="density_diversity", selection_oversample=3)
    again = _qc(small_unet_dir, timestep_sampling=sampling, selection="density_diversity", selection_oversample=3)
    other = _qc(small_unet_dir, seed=1, timestep_sampling=sampling, selection="density_diversity",
                selection_oversample=3)
    assert len(plain) == len(picked) == 10
    assert torch.equal(picked.x, again.x) and torch.equal(picked.t, again.t)
    assert not torch.equal(picked.x, other.x)
    d = picked.description
    assert (d["selection"], d["selected"], d["candidates"], d["selection_oversample"], d["num_trajectories"]) == \
        ("density_diversity", 10, 30, 3, 6)
    assert d["timesteps_kept"] == sorted({int(t) for t in picked.t.tolist()})
    assert plain.description["selection"] == "none"


def test_selection_reaches_the_artifact(small_unet_dir, tmp_path):
    import dataclasses
    import json

    from pqcad_deploy.compress import compress
    from pqcad_deploy.config import CompressConfig
    from pqcad_deploy.presets import PRESETS

    calibration = dataclasses.replace(PRESETS["fast"].calibration, selection="density_diversity",
                                      selection_oversample=2)
    compress(CompressConfig(model=str(small_unet_dir), method="minmax", distill=False, teacher_steps=10, preset="fast",
                            calibration=calibration),
             tmp_path / "art", progress=False)
    manifest = json.loads((tmp_path / "art" / "artifact.json").read_text())
    assert manifest["options"]["calibration"]["selection"] == "density_diversity"
    assert manifest["options"]["calibration"]["selection_oversample"] == 2
    described = manifest["calibration"]
    assert (described["selection"], described["selected"], described["candidates"]) == ("density_diversity", 32, 64)
