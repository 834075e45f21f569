"""The student's N/2-step timestep grid and how it sits on the teacher's N-step grid.

Progressive distillation needs every student step t -> t'' to cover whole teacher steps, so the
student grid must be every other point of the teacher grid. diffusers' own grids (checked for
``timestep_spacing`` "leading", "trailing" and "linspace", N = 10, 20, 100):

- "leading" (the builtin model): the N/2 grid is the teacher grid at odd indices ([980, 960, ..., 0]
  under [990, 980, ..., 0]). Every student step covers two teacher steps except the last one,
  t = 0 -> past 0, which is the teacher's own last step (one step).
- "trailing": the N/2 grid is the teacher grid at even indices; every student step covers exactly
  two teacher steps, the last one ending past 0.
- "linspace": the N/2 grid is *not* a subset of the N grid. The student grid is then defined as the
  even-index subset of the teacher grid explicitly.

So: diffusers' N/2 grid is used whenever it is every other teacher point (the student then also runs
correctly with diffusers' own ``DDIMScheduler.set_timesteps(N // 2)``), else the even-index subset.
Either way the artifact records the student's exact list and the engines step over that list, so the
choice never has to be recomputed downstream.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pqcad_deploy.errors import ConfigError
from pqcad_deploy.schedule import ddim_timesteps

__all__ = ["PAST_ZERO", "DistillGrid", "distill_grid"]

PAST_ZERO = -1
"""The "timestep" after the last one: alphabar = final_alpha_cumprod (diffusers' convention)."""


@dataclass(frozen=True)
class DistillGrid:
    """Teacher and student timestep lists (descending) and where the student list came from.

    Attributes:
        teacher: diffusers' N-step DDIM grid.
        student: every other point of `teacher`.
        source: "diffusers" (diffusers' N/2 grid is that subset) or "teacher_even" (explicit subset).
    """

    teacher: tuple[int, ...]
    student: tuple[int, ...]
    source: str

    def __post_init__(self) -> None:
        if not set(self.student) <= set(self.teacher):
            raise ValueError("the student grid must be a subset of the teacher grid")

    @staticmethod
    def _next(grid: tuple[int, ...], t: int) -> int:
        i = grid.index(t)
        return grid[i + 1] if i + 1 < len(grid) else PAST_ZERO

    def student_next(self, t: int) -> int:
        """t'': the student's next timestep after `t` (PAST_ZERO after its last one)."""
        return self._next(self.student, t)

    def teacher_next(self, t: int) -> int:
        """The teacher's next timestep after `t` (PAST_ZERO after its last one)."""
        return self._next(self.teacher, t)

    def teacher_path(self, t: int) -> tuple[int, ...]:
        """The timesteps the teacher steps *from* to go from student step `t` to the student's next.

        (t, t') normally; (t,) for a student step that is also the teacher's last step.
        """
        end, path, cur = self.student_next(t), [t], self.teacher_next(t)
        while cur != end:
            path.append(cur)
            cur = self.teacher_next(cur)
        return tuple(path)

    def lookup(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sample (t int64 [B] on the student grid): t' (teacher next) and t'' (student next)."""
        mid = torch.tensor([self.teacher_next(int(v)) for v in t.tolist()], dtype=torch.int64)
        end = torch.tensor([self.student_next(int(v)) for v in t.tolist()], dtype=torch.int64)
        return mid.to(t.device), end.to(t.device)

    def to_dict(self) -> dict:
        return {"teacher": list(self.teacher), "student": list(self.student), "source": self.source}


def distill_grid(scheduler_config: dict, teacher_steps: int) -> DistillGrid:
    """The teacher's N-step and the student's N/2-step grids (see the module docstring for the rule).

    Raises:
        ConfigError: if `teacher_steps` is not an even number >= 2.
    """
    if not isinstance(teacher_steps, int) or teacher_steps < 2 or teacher_steps % 2:
        raise ConfigError(f"distillation needs an even number of teacher steps >= 2; got {teacher_steps!r}.")
    teacher = tuple(ddim_timesteps(scheduler_config, teacher_steps))
    halved = tuple(ddim_timesteps(scheduler_config, teacher_steps // 2))
    if halved in (teacher[0::2], teacher[1::2]):
        return DistillGrid(teacher, halved, "diffusers")
    return DistillGrid(teacher, teacher[0::2], "teacher_even")
