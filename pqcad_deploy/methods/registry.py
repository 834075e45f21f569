"""The compression methods, one entry each: what the rest of the tool needs to know about a method.

compress, the config checks, the CLI's choices and the resume messages read these facts instead of
branching on the method's name, so adding a method is a module with a ``run(job)`` function plus one
entry in :data:`METHOD_REGISTRY`. This module is torch-free (the CLI reads it for ``--method``'s
choices); a method's module is imported only when it runs.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pqcad_deploy.errors import ConfigError

if TYPE_CHECKING:
    from pqcad_deploy.presets import PresetSettings, ReconstructionConfig

__all__ = ["MethodJob", "MethodSpec", "METHOD_REGISTRY", "method_spec"]


@dataclass(frozen=True)
class MethodJob:
    """What compress hands a method: the run's options and resolved preset, the FP model (a reference
    the method must not modify), the per-layer bit plan and the calibration set (C_QC)."""

    config: Any  # CompressConfig (not imported: config.py imports this module)
    settings: PresetSettings
    fp_unet: Any
    plan: dict
    calibration: Any
    batch_size: int
    device: str
    progress: bool
    checkpoint: Any = None

    def reconstruction_config(self) -> ReconstructionConfig:
        """The preset's block-reconstruction settings with this run's seed and --layer-loss."""
        return dataclasses.replace(self.settings.reconstruction, seed=self.config.seed,
                                   layer_loss=self.config.layer_loss)


@dataclass(frozen=True)
class MethodSpec:
    """One compression method.

    Args:
        run: ``"module:function"``; the function takes a :class:`MethodJob` and returns (student,
            the method's report).
        first_last_default: ``--first-last`` when not given (choices.FIRST_LAST_POLICIES).
        act_scale_init_default: ``--act-scale-init`` when not given (choices.ACT_SCALE_INITS).
        calibration_timesteps: how the preset's C_QC draws timesteps ("uniform", or "normal": PTQ4DM's
            normally distributed timesteps, PQ's C_QC).
        learns_activation_scales: has a stage that learns activation scales: takes --act-scale-init
            and --layer-loss, and gets the activation-scale check.
        resumable: saves a checkpoint after every finished block (``--resume`` continues it).
    """

    run: str
    first_last_default: str
    act_scale_init_default: str
    calibration_timesteps: str
    learns_activation_scales: bool
    resumable: bool

    def quantize(self, job: MethodJob) -> tuple[Any, dict]:
        module, _, function = self.run.partition(":")
        return getattr(importlib.import_module(module), function)(job)


METHOD_REGISTRY: dict[str, MethodSpec] = {
    # the plain baseline: per-channel min-max weight scales, per-tensor min-max activation scales
    "minmax": MethodSpec(run="pqcad_deploy.methods.minmax:run", first_last_default="target",
                         act_scale_init_default="minmax", calibration_timesteps="uniform",
                         learns_activation_scales=False, resumable=False),
    # block reconstruction at fixed bits (AdaRound rounding, learned scales); the reconstruction methods
    # keep conv_in / conv_out inputs in float and start activation scales from the MSE-optimal clipping
    # (10k FID, PQ W8A8: 17.44 -> 14.27 on Fashion-MNIST, 24.15 -> 22.62 on CIFAR-10; RESULTS section 16)
    "brecq": MethodSpec(run="pqcad_deploy.methods.brecq:run", first_last_default="w8-fp-input",
                        act_scale_init_default="mse", calibration_timesteps="uniform",
                        learns_activation_scales=True, resumable=True),
    # PQ: reconstruction down the bit ladder with momentum-based transitions, on C_QC
    "pqcad": MethodSpec(run="pqcad_deploy.methods.pqcad:run", first_last_default="w8-fp-input",
                        act_scale_init_default="mse", calibration_timesteps="normal",
                        learns_activation_scales=True, resumable=True),
}


def method_spec(name: str) -> MethodSpec:
    """The registry entry of `name`."""
    try:
        return METHOD_REGISTRY[name]
    except KeyError:
        raise ConfigError(f"--method must be one of {', '.join(METHOD_REGISTRY)}; got {name!r}.") from None
