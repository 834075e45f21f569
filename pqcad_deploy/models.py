"""Load a diffusers UNet2DModel and its noise schedule from a directory, a hub id, or `builtin`.

Accepted layouts:
- a model folder: `config.json` (+ `diffusion_pytorch_model.safetensors` or `.bin`) and
  `scheduler_config.json` side by side (the embedded default uses this);
- a pipeline folder: `model_index.json` with `unet/` and `scheduler/` subfolders;
- a hub id (`owner/name`), only where the model hub is reachable.
The schedule is always returned as a DDIMScheduler config, the sampler every stage uses.
"""

from __future__ import annotations

import json
import socket
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from pqcad_deploy.errors import ModelLoadError

__all__ = ["BUILTIN_MODEL_DIR", "LoadedModel", "resolve_model_dir", "load_model", "ddim_config"]

BUILTIN_MODEL_DIR = Path(__file__).resolve().parent / "builtin" / "fashion_mnist_ddpm"

_SUPPORTED_CLASS = "UNet2DModel"


@dataclass
class LoadedModel:
    """A loaded UNet with its schedule and where it came from."""

    unet: "object"  # diffusers.UNet2DModel; typed loosely to keep diffusers a lazy import
    scheduler_config: dict
    source: str
    unet_dir: Path | None


def ddim_config(scheduler_config: dict) -> dict:
    """The DDIMScheduler config for any diffusers scheduler config (DDPM, DDIM, ...)."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(scheduler_config)
    config = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
    config["_class_name"] = "DDIMScheduler"
    return json.loads(json.dumps(config))  # plain JSON types (tuples -> lists)


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    try:
        from huggingface_hub import constants

        host = urllib.parse.urlparse(constants.ENDPOINT).hostname
        if not host:
            return False
        with socket.create_connection((host, 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def resolve_model_dir(model: str) -> tuple[Path, Path]:
    """(unet_dir, scheduler_dir) for a local model; raises ModelLoadError for anything else."""
    path = BUILTIN_MODEL_DIR if model == "builtin" else Path(model).expanduser()
    if model == "builtin" and not (path / "config.json").is_file():
        raise ModelLoadError(f"the embedded default model is missing from {path}; reinstall pqcad-deploy.")
    if not path.is_dir():
        raise ModelLoadError(f"model directory {model!r} does not exist.")
    if (path / "model_index.json").is_file() or (path / "unet" / "config.json").is_file():
        unet_dir, scheduler_dir = path / "unet", path / "scheduler"
    else:
        unet_dir = scheduler_dir = path
    if not (unet_dir / "config.json").is_file():
        raise ModelLoadError(
            f"{model!r} is not a diffusers model directory: no config.json in {unet_dir} "
            "(expected config.json + diffusion_pytorch_model.safetensors, or a pipeline with unet/)."
        )
    if not (scheduler_dir / "scheduler_config.json").is_file():
        raise ModelLoadError(
            f"{model!r} has no scheduler_config.json in {scheduler_dir}; the noise schedule is needed "
            "to sample and to calibrate: add the scheduler config the model was trained with."
        )
    return unet_dir, scheduler_dir


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{what} {path} is not valid JSON ({exc}).") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{what} {path} is not a JSON object.")
    return data


def _quiet_diffusers() -> None:
    """diffusers warns about optional accelerate on every load; our users cannot act on it."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()


def _load_local(model: str) -> LoadedModel:
    from diffusers import UNet2DModel

    _quiet_diffusers()

    unet_dir, scheduler_dir = resolve_model_dir(model)
    unet_config = _read_json(unet_dir / "config.json", "UNet config")
    cls = unet_config.get("_class_name")
    if cls != _SUPPORTED_CLASS:
        raise ModelLoadError(
            f"{model!r} holds a {cls or 'model of unknown class'}, not a {_SUPPORTED_CLASS}; "
            "pqcad-deploy compresses unconditional diffusers UNet2DModel models."
        )
    scheduler_config = _read_json(scheduler_dir / "scheduler_config.json", "scheduler config")
    try:
        unet = UNet2DModel.from_pretrained(str(unet_dir), local_files_only=True)
    except Exception as exc:  # diffusers raises OSError, ValueError, safetensors errors...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot load the UNet weights from {unet_dir}: {first}") from None
    try:
        config = ddim_config(scheduler_config)
    except Exception as exc:
        raise ModelLoadError(f"cannot read the scheduler config in {scheduler_dir}: {exc}") from None
    source = "builtin" if model == "builtin" else str(Path(model).resolve())
    return LoadedModel(unet=unet.eval(), scheduler_config=config, source=source, unet_dir=unet_dir)


def _load_hub(model: str) -> LoadedModel:
    if not _hub_reachable():
        raise ModelLoadError(
            f"{model!r} is not a local directory and the model hub cannot be reached from this "
            "machine; pass a local directory in diffusers' layout (config.json + weights + "
            "scheduler_config.json), or 'builtin'."
        )
    from diffusers import DDIMScheduler, UNet2DModel

    try:
        try:
            unet = UNet2DModel.from_pretrained(model, subfolder="unet")
            scheduler = DDIMScheduler.from_pretrained(model, subfolder="scheduler")
        except OSError:
            unet = UNet2DModel.from_pretrained(model)
            scheduler = DDIMScheduler.from_pretrained(model)
    except Exception as exc:
        raise ModelLoadError(f"cannot load {model!r} from the model hub: {exc}") from None
    return LoadedModel(unet=unet.eval(), scheduler_config=ddim_config(dict(scheduler.config)),
                       source=model, unet_dir=None)


def _looks_like_hub_id(model: str) -> bool:
    parts = model.split("/")
    return (len(parts) == 2 and all(parts) and not model.startswith((".", "/", "~"))
            and not Path(model).exists())


def load_model(model: str = "builtin") -> LoadedModel:
    """Load a UNet2DModel + DDIM schedule; every failure is one ModelLoadError sentence."""
    if model != "builtin" and _looks_like_hub_id(model):
        return _load_hub(model)
    return _load_local(model)
