"""C_DC, the distillation calibration set (docs/ARCHITECTURE.md, The method): (x_t, t) pairs for CAD.

t is drawn uniformly over the student's grid, *stratified*: with K student steps and M pairs every
step gets floor(M/K) pairs and M mod K seeded-random steps one more, so the histogram is uniform up to
one count instead of up to sampling noise. All K student steps are included, the last one too: the
student runs it at sampling time, and its target (the teacher's step(s) to past 0) is well defined.

x_t comes from one of two FP sources, both data-free:
- "trajectories": FP DDIM trajectories on the teacher's N-step grid from seeded noise, read at the
  student timesteps (the points the student will actually visit; distinct trajectories per step).
- "noise_injection": the same trajectories' final samples x_0, pushed forward with q(x_t | x_0) =
  N(alpha_t x_0, sigma_t^2 I) with fresh seeded noise (more diversity off the teacher's own paths).
Then each x_t gets an extra Gaussian perturbation of std `perturbation * sigma_t` (the method's 0.01-0.05
of sigma_t) so the student also sees the neighbourhood of the trajectory.

With ``fresh`` the fixed pairs are only the start: :meth:`DCSet.draw` makes new pairs for every
training batch from the same FP pools (the trajectories' states at the student timesteps and their
final samples), t uniform over the student grid, each pair from noise injection with probability
``mix`` and from a trajectory state otherwise, with fresh Gaussian noise either way, so the student
never sees the same pair twice (issue 14: the fixed 1,024-pair set could be memorised).

A conditional model's trajectories are guided as its calibration's are (pqcad_deploy.conditioning:
trajectory j conditioned on class ``j % classes``), and every pair carries the condition of the
trajectory it came from, or, when the model guides, the null class for a seeded half of the pairs:
the student learns both branches of guidance, each against the teacher's two steps on that branch
(per-branch distillation; the guided combination is formed at sampling time, as for the teacher).
An unconditional model draws exactly the random numbers it drew before.

Deterministic for a seed: every draw comes from one seeded ``torch.Generator`` in a fixed order.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from pqcad_deploy.conditioning import UNCONDITIONAL, Conditioning, guided_eps, select_rows
from pqcad_deploy.distill.grid import DistillGrid
from pqcad_deploy.distill.target import DDIMCoefficients
from pqcad_deploy.presets import DC_SOURCES, DCConfig, DCSource
from pqcad_deploy.schedule import make_ddim_scheduler

__all__ = ["DC_SOURCES", "DCSource", "DCConfig", "HELDOUT_SEED_OFFSET", "DCSet",
           "DCBatch", "stratified_timesteps", "collect_dc"]



HELDOUT_SEED_OFFSET = 7_919


@dataclass(frozen=True)
class DCBatch:
    """One freshly drawn batch: x_t, t, which pairs were noise-injected, and the x_0 each was noised from."""

    x: torch.Tensor
    t: torch.Tensor
    injected: torch.Tensor  # bool [B]
    x0: torch.Tensor  # the pool sample behind each injected pair (unused for trajectory pairs)
    cond: dict[str, torch.Tensor] = field(default_factory=dict)  # a conditional model's, per pair


@dataclass
class DCSet:
    """C_DC pairs: x float32 [M, C, H, W], t int64 [M] on the student grid, and what was drawn.

    `x0` holds, for "noise_injection", the clean FP sample each x_t was noised from (None otherwise);
    it is kept for checks and reports, the distillation itself never reads it. With ``fresh`` the
    pools (`states` [n, K, C, H, W] at the student timesteps, `finals` [n, C, H, W]) stay, and the
    distillation draws its batches with :meth:`draw`.
    """

    x: torch.Tensor
    t: torch.Tensor
    description: dict
    x0: torch.Tensor | None = None
    states: torch.Tensor | None = None
    finals: torch.Tensor | None = None
    student: tuple[int, ...] = ()
    mix: float = 0.5
    perturbation: float = 0.0
    cond: dict[str, torch.Tensor] = field(default_factory=dict)
    """The fixed pairs' conditioning (rows of `x`); empty for an unconditional model."""
    pool_cond: dict[str, torch.Tensor] = field(default_factory=dict)
    """The conditioning of each pooled trajectory (rows of `states` and `finals`)."""
    conditioning: Conditioning = UNCONDITIONAL

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def fresh(self) -> bool:
        return self.states is not None

    def draw(self, batch_size: int, generator: torch.Generator, coeffs: DDIMCoefficients) -> DCBatch:
        """`batch_size` new pairs (module docstring); every random number is drawn whatever the branch,
        so the generator advances the same way for every batch (bitwise resume)."""
        if self.states is None or self.finals is None:
            raise RuntimeError("this C_DC was drawn without fresh=True; it has no pools to draw from")
        n, k = self.states.shape[0], self.states.shape[1]
        index = torch.randint(0, k, (batch_size,), generator=generator)
        t = torch.tensor(self.student, dtype=torch.int64)[index]
        injected = torch.rand(batch_size, generator=generator) < self.mix
        traj_rows = torch.randint(0, n, (batch_size,), generator=generator)
        from_traj = self.states[traj_rows, index]
        x0_rows = torch.randint(0, n, (batch_size,), generator=generator)
        x0 = self.finals[x0_rows]
        alpha, sigma = (v.to(torch.float32).reshape(-1, 1, 1, 1) for v in coeffs.alpha_sigma(t))
        noised = alpha * x0 + sigma * torch.randn(x0.shape, generator=generator)
        x = torch.where(injected.reshape(-1, 1, 1, 1), noised, from_traj)
        jitter = torch.randn(x.shape, generator=generator)
        if self.perturbation > 0:
            x = x + self.perturbation * sigma * jitter
        cond = _pair_conditions(self.pool_cond, torch.where(injected, x0_rows, traj_rows), self.conditioning,
                                generator)
        return DCBatch(x=x.contiguous(), t=t, injected=injected, x0=x0, cond=cond)


def _pair_conditions(pool_cond: dict[str, torch.Tensor], rows: torch.Tensor, conditioning: Conditioning,
                     generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The conditions of pairs from pooled trajectories `rows`: each trajectory's own, and, when the model
    guides, the null condition for a seeded half (both branches of guidance are trained). Draws no random
    number for an unconditional model."""
    cond = select_rows(pool_cond, rows)
    if cond and conditioning.guides:
        null = torch.rand(len(rows), generator=generator) < 0.5
        nulls = conditioning.null(len(rows))
        cond = {k: torch.where(null.reshape(-1, *[1] * (v.dim() - 1)), nulls[k], v) for k, v in cond.items()}
    return cond


def stratified_timesteps(student: tuple[int, ...], size: int, generator: torch.Generator) -> torch.Tensor:
    """`size` int64 timesteps, each student step floor(size/K) or one more times, in seeded random order."""
    k = len(student)
    counts = torch.full((k,), size // k, dtype=torch.int64)
    counts[torch.randperm(k, generator=generator)[: size % k]] += 1
    t = torch.repeat_interleave(torch.tensor(student, dtype=torch.int64), counts)
    return t[torch.randperm(size, generator=generator)]


@torch.no_grad()
def _fp_trajectories(unet: torch.nn.Module, scheduler_config: dict, grid: DistillGrid, noise: torch.Tensor,
                     batch_size: int, device: str, progress: bool, pool_cond: dict[str, torch.Tensor],
                     conditioning: Conditioning) -> tuple[torch.Tensor, torch.Tensor]:
    """FP DDIM (eta 0) on the teacher grid: x at every student timestep [n, K, ...] and final x_0 [n, ...]."""
    scheduler = make_ddim_scheduler(scheduler_config, len(grid.teacher))
    position = {t: k for k, t in enumerate(grid.student)}
    n = noise.shape[0]
    at_student = torch.empty((n, len(grid.student), *noise.shape[1:]), dtype=torch.float32)
    final = torch.empty_like(noise)
    n_batches = (n + batch_size - 1) // batch_size
    bar = tqdm(total=n_batches * len(grid.teacher), desc="C_DC trajectories", unit="step", disable=not progress)
    for start in range(0, n, batch_size):
        x = noise[start:start + batch_size].to(device)
        cond = select_rows(pool_cond, slice(start, start + x.shape[0]))
        for t in scheduler.timesteps:
            if int(t) in position:
                at_student[start:start + x.shape[0], position[int(t)]] = x.cpu()
            t_batch = torch.full((x.shape[0],), float(t), device=device)
            x = scheduler.step(guided_eps(unet, x, t_batch, cond, conditioning), t, x, eta=0.0).prev_sample
            bar.update(1)
        final[start:start + x.shape[0]] = x.cpu()
    bar.close()
    return at_student, final


def collect_dc(unet: torch.nn.Module, scheduler_config: dict, grid: DistillGrid,
               image_shape: tuple[int, int, int], config: DCConfig, device: str = "cpu",
               progress: bool = True, conditioning: Conditioning = UNCONDITIONAL) -> DCSet:
    """Draw C_DC with the FP model (module docstring).

    Runs ceil(size / K) FP trajectories (K student steps), enough for distinct trajectories at each
    step; noise injection reuses their final samples as its x_0 pool.
    """
    k = len(grid.student)
    generator = torch.Generator().manual_seed(config.seed)
    n_traj = max(-(-config.size // k), config.trajectories or 0)
    noise = torch.randn((n_traj, *image_shape), generator=generator)
    t = stratified_timesteps(grid.student, config.size, generator)
    pool_cond = conditioning.draw(torch.arange(n_traj))
    at_student, final = _fp_trajectories(unet, scheduler_config, grid, noise, config.batch_size, device, progress,
                                         pool_cond, conditioning)
    coeffs = DDIMCoefficients.from_config(scheduler_config)
    alpha, sigma = (v.to(torch.float32).reshape(-1, 1, 1, 1) for v in coeffs.alpha_sigma(t))
    position = {s: i for i, s in enumerate(grid.student)}
    x0 = None
    if config.source == "trajectories":
        # distinct trajectories for the pairs of one step: a seeded permutation per step
        traj = torch.empty(config.size, dtype=torch.int64)
        for s in grid.student:
            rows = (t == s).nonzero().flatten()
            traj[rows] = torch.randperm(n_traj, generator=generator)[: rows.numel()]
        x = at_student[traj, torch.tensor([position[int(s)] for s in t.tolist()], dtype=torch.int64)]
        rows = traj
    else:
        rows = torch.randint(0, n_traj, (config.size,), generator=generator)
        x0 = final[rows]
        x = alpha * x0 + sigma * torch.randn(x0.shape, generator=generator)
    if config.perturbation > 0:
        x = x + config.perturbation * sigma * torch.randn(x.shape, generator=generator)
    cond = _pair_conditions(pool_cond, rows, conditioning, generator)
    description = {"source": config.source, "config": asdict(config), "trajectories": n_traj,
                   "student_timesteps": list(grid.student), "teacher_steps": len(grid.teacher),
                   "stratified": True, "fresh": config.fresh}
    if conditioning is not UNCONDITIONAL:  # an unconditional C_DC's description stays as it was
        description["conditioning"] = conditioning.to_dict()
    extra = {"cond": cond, "pool_cond": pool_cond, "conditioning": conditioning}
    if not config.fresh:
        return DCSet(x=x.contiguous(), t=t, description=description, x0=x0, **extra)
    return DCSet(x=x.contiguous(), t=t, description=description, x0=x0, states=at_student, finals=final,
                 student=tuple(grid.student), mix=float(config.mix), perturbation=float(config.perturbation),
                 **extra)
