"""Load a diffusers UNet2DModel and its noise schedule from a directory, a hub id, or `builtin`.

Accepted layouts:
- a model folder: `config.json` (+ `diffusion_pytorch_model.safetensors` or `.bin`) and
  `scheduler_config.json` side by side (the embedded default uses this);
- a pipeline folder: `model_index.json` with `unet/` and `scheduler/` subfolders;
- a hub id (`owner/name`), only where the model hub is reachable.
The schedule is always returned as a DDIMScheduler config, the sampler every stage uses.

Every loaded model is checked before any slow work (`check_model`): finite weights, a sample_size
the UNet's downsampling can run, and one dry forward pass on a single sample (a few milliseconds on
the embedded model), so a model that cannot work fails at load time with one sentence instead of
minutes later with a traceback or garbage.
"""

from __future__ import annotations

import json
import socket
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from pqcad_deploy.errors import ModelLoadError
from pqcad_deploy.model_kinds import detect_model_kind, read_json_config as _read_json, require_supported_kind

__all__ = ["BUILTIN_MODEL_DIR", "BUILTIN_MODELS", "LoadedModel", "is_builtin", "resolve_model_dir", "load_model", "ddim_config", "check_model",
           "quiet_diffusers", "size_multiple"]

_BUILTIN_ROOT = Path(__file__).resolve().parent / "builtin"
BUILTIN_MODELS: dict[str, Path] = {
    "builtin": _BUILTIN_ROOT / "fashion_mnist_ddpm",  # the default: 1 channel, 32 px (padded Fashion-MNIST)
    "builtin:fashion-mnist": _BUILTIN_ROOT / "fashion_mnist_ddpm",
    "builtin:cifar10": _BUILTIN_ROOT / "cifar10_ddpm",  # 3 channels, 32 px (MODEL_CARD.md beside it)
    # class-conditional latent pipeline (AutoencoderKL + cross-attention UNet2DConditionModel on a class table)
    "builtin:cifar10-latent": _BUILTIN_ROOT / "cifar10_latent",
}
"""The models that ship with the package, by the name --model takes."""
BUILTIN_MODEL_DIR = BUILTIN_MODELS["builtin"]


def is_builtin(model: str) -> bool:
    """`builtin` or `builtin:NAME` (a name that is not in BUILTIN_MODELS is refused by the loader)."""
    return model == "builtin" or model.startswith("builtin:")


@dataclass
class LoadedModel:
    """A loaded UNet with its schedule, where it came from and, for a latent pipeline, its other parts.

    Attributes:
        unet: diffusers UNet2DModel or UNet2DConditionModel (typed loosely: diffusers is a lazy import).
        scheduler_config: the DDIMScheduler config every stage samples with.
        source: the --model value (builtin name, absolute folder, hub id).
        unet_dir: the folder the UNet's weights came from, or None from the hub.
        kind: the folder's model kind (pqcad_deploy.model_kinds.MODEL_KINDS).
        vae: the AutoencoderKL of a latent pipeline (float32), or None for a pixel-space model.
        class_table: the learned class embeddings of a class-embedding pipeline (latent_parts.ClassTable).
        text_encoder: the CLIP text encoder + tokenizer of a text-conditional pipeline (latent_parts.TextEncoder).
    """

    unet: "object"
    scheduler_config: dict
    source: str
    unet_dir: Path | None
    kind: str = "unconditional-pixel"
    vae: "object | None" = None
    class_table: "object | None" = None
    text_encoder: "object | None" = None
    root: Path | None = None
    """The pipeline folder of a latent model (its parts' files are hashed into the artifact's provenance)."""

    @property
    def decode(self):
        """latents -> images in [-1, 1] through the VAE, or None when the UNet samples pixels."""
        if self.vae is None:
            return None
        from functools import partial

        from pqcad_deploy.latent_parts import vae_decode

        return partial(vae_decode, self.vae)

    def to(self, device: str) -> "LoadedModel":
        """Move the UNet and the VAE (the parts that run per sample) to `device`; returns self."""
        self.unet = self.unet.to(device)
        if self.vae is not None:
            self.vae = self.vae.to(device)
        return self


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
    """(unet_dir, scheduler_dir) for a local model of a supported kind; raises ModelLoadError for anything else.

    The model's kind (pqcad_deploy/model_kinds.py) is checked first, from its JSON configs alone, so a
    conditional or latent model is refused with its own line before any weights are read.
    """
    if is_builtin(model) and model not in BUILTIN_MODELS:
        raise ModelLoadError(f"unknown builtin model {model!r}; the builtin models are "
                             f"{', '.join(sorted(BUILTIN_MODELS))}.")
    path = BUILTIN_MODELS[model] if is_builtin(model) else Path(model).expanduser()
    if is_builtin(model) and not ((path / "config.json").is_file() or (path / "model_index.json").is_file()):
        raise ModelLoadError(f"the embedded model {model!r} is missing from {path}; reinstall pqcad-deploy.")
    if not path.is_dir():
        raise ModelLoadError(f"model directory {model!r} does not exist.")
    require_supported_kind(path, model)
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


def quiet_diffusers() -> None:
    """diffusers warns about optional accelerate on every load; our users cannot act on it."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()


def size_multiple(unet) -> int:
    """What every image side must be divisible by: 2 ** (number of down blocks that downsample).

    Each downsampling halves the feature map (a stride-2 conv or pool rounds an odd side up), and
    the up path doubles it again and concatenates it with the skip connection of the same level, so
    an odd side anywhere on the way down ends in a size mismatch.
    """
    down = sum(1 for block in getattr(unet, "down_blocks", []) if getattr(block, "downsamplers", None))
    return 2 ** down


def _sides(sample_size) -> tuple[int, int] | None:
    if isinstance(sample_size, int) and not isinstance(sample_size, bool):
        return sample_size, sample_size
    if (isinstance(sample_size, (list, tuple)) and len(sample_size) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in sample_size)):
        return int(sample_size[0]), int(sample_size[1])
    return None


def check_model(unet, where: str, config_path: str | None = None) -> None:
    """Refuse a UNet that cannot work before any slow step; every failure is one ModelLoadError.

    Checks, cheapest first: every floating-point weight finite (NaN / Inf would compress into an
    artifact that samples noise, or fail deep inside calibration); `sample_size` positive and
    divisible by :func:`size_multiple` (names the sizes that work); one dry forward pass of a single
    zero sample at the model's own device and dtype, whose output must have the input's shape and be
    finite (the catch-all for any other config the UNet cannot run).
    """
    import torch

    from pqcad_deploy.conditioning import dry_run_conditions

    config_path = config_path or "the UNet's config.json"
    bad = [name for name, t in unet.state_dict().items()
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ModelLoadError(f"{where} has NaN or Inf in {len(bad)} weight tensor(s) (first: {bad[0]}); such a "
                             "model cannot be compressed or sampled: use a finite checkpoint (retrain or restore it).")
    cfg = unet.config
    sides = _sides(cfg.get("sample_size"))
    if sides is None or min(sides) <= 0:
        raise ModelLoadError(f"{where}: sample_size {cfg.get('sample_size')!r} in {config_path} is not a positive "
                             "integer (or a pair of them); set it to the image size the model was trained on.")
    multiple = size_multiple(unet)
    for side in sides:
        if side % multiple:
            lower, upper = side - side % multiple, side - side % multiple + multiple
            near = f"{lower} or {upper}" if lower > 0 else f"{upper}"
            down = multiple.bit_length() - 1
            raise ModelLoadError(
                f"{where}: sample_size {cfg.get('sample_size')!r} in {config_path} cannot run through this UNet: "
                f"its {down} downsampling block(s) need every side to be a multiple of {multiple} "
                f"(e.g. {near}); set sample_size to the size the model was trained on.")
    channels = int(cfg.get("in_channels", 0) or 0)
    param = next(iter(unet.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x = torch.zeros((1, channels, *sides), device=device, dtype=dtype)
    t = torch.zeros((1,), device=device, dtype=torch.long)
    try:
        with torch.no_grad():
            out = unet(x, t, **dry_run_conditions(cfg, 1, device)).sample
    except Exception as exc:  # any shape / config error deep inside diffusers
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ModelLoadError(f"{where}: a test forward pass of one {channels}x{sides[0]}x{sides[1]} sample fails "
                             f"({type(exc).__name__}: {first[:300]}); check {config_path} against the weights.") from None
    if tuple(out.shape) != tuple(x.shape):
        raise ModelLoadError(f"{where}: the UNet maps a {list(x.shape)} sample to {list(out.shape)}; a diffusion "
                             "UNet must predict the sample's own shape (in_channels == out_channels), fix "
                             f"{config_path}.")
    if not bool(torch.isfinite(out).all()):
        raise ModelLoadError(f"{where}: a test forward pass of one zero sample gives NaN or Inf although the weights "
                             "are finite (they overflow); the model cannot be compressed: check its weights.")


_UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")


LATENT_PARTS: dict[str, tuple[str, ...]] = {
    "class-embedding-latent": ("vae", "class_table"),
    "text-conditional-latent": ("vae", "text_encoder"),
}
"""The LoadedModel parts beside the UNet each latent model kind has (pqcad_deploy.model_kinds names the kinds)."""


def load_latent_parts(kind: str, root: Path, without: tuple[str, ...] = ()) -> dict:
    """A latent pipeline's parts (pqcad_deploy.latent_parts loads them) by LoadedModel field, but those in
    `without`; {} for a pixel-space kind."""
    from pqcad_deploy import latent_parts

    loaders = {"vae": lambda folder: latent_parts.load_vae(folder)[0], "class_table": latent_parts.load_class_table,
               "text_encoder": latent_parts.load_text_encoder}
    return {part: loaders[part](root) for part in LATENT_PARTS.get(kind, ()) if part not in without}


def _load_local(model: str) -> LoadedModel:
    import diffusers
    import torch

    quiet_diffusers()

    unet_dir, scheduler_dir = resolve_model_dir(model)
    root = BUILTIN_MODELS[model] if is_builtin(model) else Path(model).expanduser()
    kind = detect_model_kind(root).name
    unet_config = _read_json(unet_dir / "config.json", "UNet config")
    cls = unet_config.get("_class_name")
    if cls not in _UNET_CLASSES:
        raise ModelLoadError(
            f"{model!r} holds a {cls or 'model of unknown class'}, not a {' or a '.join(_UNET_CLASSES)}; "
            "pqcad-deploy compresses diffusers UNets."
        )
    scheduler_config = _read_json(scheduler_dir / "scheduler_config.json", "scheduler config")
    try:  # float32 whatever the file holds (the latent builtin ships float16 weights)
        unet = getattr(diffusers, cls).from_pretrained(str(unet_dir), local_files_only=True, torch_dtype=torch.float32)
    except Exception as exc:  # diffusers raises OSError, ValueError, safetensors errors...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot load the UNet weights from {unet_dir}: {first}") from None
    try:
        config = ddim_config(scheduler_config)
    except Exception as exc:
        raise ModelLoadError(f"cannot read the scheduler config in {scheduler_dir}: {exc}") from None
    source = model if is_builtin(model) else str(Path(model).resolve())
    unet = unet.eval()
    check_model(unet, f"the embedded model {model!r}" if is_builtin(model) else f"model {model!r}",
                str(unet_dir / "config.json"))
    parts = load_latent_parts(kind, root)
    return LoadedModel(unet=unet, scheduler_config=config, source=source, unet_dir=unet_dir, kind=kind,
                       root=root if parts else None, **parts)


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
    unet = unet.eval()
    check_model(unet, f"model {model!r}")
    return LoadedModel(unet=unet, scheduler_config=ddim_config(dict(scheduler.config)),
                       source=model, unet_dir=None)


def _looks_like_hub_id(model: str) -> bool:
    parts = model.split("/")
    return (len(parts) == 2 and all(parts) and not model.startswith((".", "/", "~"))
            and not Path(model).exists())


def load_model(model: str = "builtin") -> LoadedModel:
    """Load a UNet2DModel + DDIM schedule; every failure is one ModelLoadError sentence."""
    if not is_builtin(model) and _looks_like_hub_id(model):
        return _load_hub(model)
    return _load_local(model)
