"""C_DC: stratified uniform timesteps over the student grid, sane x_t, determinism."""

from __future__ import annotations

import pytest
import torch

from pqcad_deploy.distill.dc import DCConfig, collect_dc
from pqcad_deploy.distill.grid import distill_grid
from pqcad_deploy.distill.target import DDIMCoefficients
from pqcad_deploy.errors import ConfigError
from pqcad_deploy.models import load_model


@pytest.fixture(scope="module")
def fp(small_unet_dir):
    return load_model(str(small_unet_dir))


def _collect(fp, **kw):
    grid = distill_grid(fp.scheduler_config, 10)
    return grid, collect_dc(fp.unet.eval(), fp.scheduler_config, grid, (1, 32, 32), DCConfig(**kw), progress=False)


@pytest.mark.parametrize("size", [50, 53])
def test_timesteps_uniform_over_student_grid(fp, size):
    grid, dc = _collect(fp, size=size, seed=3)
    counts = torch.stack([(dc.t == s).sum() for s in grid.student])
    assert len(dc) == size and set(dc.t.tolist()) == set(grid.student)
    assert int(counts.sum()) == size and int(counts.max() - counts.min()) <= (0 if size % 5 == 0 else 1)
    assert dc.t.tolist() != sorted(dc.t.tolist(), reverse=True)  # shuffled, not in blocks


def test_noise_injection_statistics(fp):
    grid, dc = _collect(fp, size=50, source="noise_injection", perturbation=0.05, seed=0)
    coeffs = DDIMCoefficients.from_config(fp.scheduler_config)
    for s in grid.student:
        rows = dc.t == s
        alpha, sigma = (float(v) for v in coeffs.alpha_sigma(torch.tensor([s])))
        noise = dc.x[rows] - alpha * dc.x0[rows]
        expected = sigma * (1 + 0.05 ** 2) ** 0.5
        assert float(noise.std()) == pytest.approx(expected, rel=0.05), s
        assert abs(float(noise.mean())) < 0.05 * expected


def test_trajectories_sane_and_deterministic(fp):
    _, a = _collect(fp, size=20, seed=1)
    _, b = _collect(fp, size=20, seed=1)
    _, c = _collect(fp, size=20, seed=2)
    assert torch.equal(a.x, b.x) and torch.equal(a.t, b.t)
    assert not torch.equal(a.x, c.x)
    assert torch.isfinite(a.x).all() and a.x0 is None
    # the extra perturbation is std 0.02 * sigma_t around the same trajectory points
    _, clean = _collect(fp, size=20, seed=1, perturbation=0.0)
    assert torch.equal(clean.t, a.t)
    sigma = DDIMCoefficients.from_config(fp.scheduler_config).alpha_sigma(a.t)[1].float().reshape(-1, 1, 1, 1)
    assert float(((a.x - clean.x) / sigma).std()) == pytest.approx(0.02, rel=0.05)
    with pytest.raises(ConfigError):
        DCConfig(source="data")


def test_fresh_pairs_have_the_stated_timestep_source_and_noise_distributions(fp):
    """Every draw is new; t is uniform over the student grid; a share `mix` is noise-injected, whose
    noise (x - alpha x0) / sigma is standard normal; the rest are exactly pool states at their t."""
    grid, dc = _collect(fp, size=10, seed=4, fresh=True, mix=0.3, perturbation=0.0, trajectories=6)
    assert dc.fresh and dc.states.shape[:2] == (6, len(grid.student))
    coeffs = DDIMCoefficients.from_config(fp.scheduler_config)
    generator = torch.Generator().manual_seed(0)
    batches = [dc.draw(400, generator, coeffs) for _ in range(5)]
    t = torch.cat([b.t for b in batches])
    injected = torch.cat([b.injected for b in batches])
    counts = torch.stack([(t == s).sum() for s in grid.student]).double()
    expected = len(t) / len(grid.student)
    assert float(((counts - expected) ** 2 / expected).sum()) < 20.5  # chi-square, 4 dof, p ~ 4e-4
    assert float(injected.double().mean()) == pytest.approx(0.3, abs=0.03)
    assert not torch.equal(batches[0].x, batches[1].x)
    for batch in batches:
        alpha, sigma = (v.float().reshape(-1, 1, 1, 1) for v in coeffs.alpha_sigma(batch.t))
        noise = ((batch.x - alpha * batch.x0) / sigma)[batch.injected]
        assert float(noise.mean()) == pytest.approx(0.0, abs=0.02) and float(noise.std()) == pytest.approx(1, abs=0.02)
        position = {s: k for k, s in enumerate(grid.student)}
        for x, s in zip(batch.x[~batch.injected][:20], batch.t[~batch.injected][:20]):
            pool = dc.states[:, position[int(s)]]
            assert any(torch.equal(x, p) for p in pool)
    again = dc.draw(400, torch.Generator().manual_seed(0), coeffs)
    assert torch.equal(again.x, batches[0].x) and torch.equal(again.t, batches[0].t)  # seeded
    with pytest.raises(RuntimeError, match="fresh=True"):
        _collect(fp, size=10, seed=4)[1].draw(2, generator, coeffs)
    with pytest.raises(ConfigError, match="mix"):
        DCConfig(mix=1.5)
