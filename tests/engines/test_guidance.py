"""Classifier-free guidance of the torch-free sampler (engines/guidance.py), pinned to diffusers.

The arithmetic is checked exactly on hand-computed arrays; the whole guided DDIM loop is checked
against `StableDiffusionPipeline` (SD-1.5-shaped fixture of tests/_pipelines.py, DDIM scheduler) on
the same latents and prompt embeddings, with and without `guidance_rescale`, and on the
class-conditional UNet2DModel fixture against a torch loop over diffusers' `DDIMScheduler.step`.
The torch UNet is wrapped into the numpy `model(x, t, conditions)` here, in the test: engines never
sees torch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DModel

from pqcad_deploy.engines.ddim import DDIMSampler, ddim_timesteps
from pqcad_deploy.engines.errors import ConfigError, EngineError
from pqcad_deploy.engines.guidance import Guidance, guided_ddim, rescale_noise_cfg

from _pipelines import NULL_CLASS, SD_LATENT_SIZE

STEPS = 5
# Agreement with diffusers in float32, as max|ours - diffusers| / max|diffusers|. Measured (torch 2.13
# CPU, diffusers 0.42.1, numpy 2, OMP_NUM_THREADS=1, deterministic run to run):
#   one step from diffusers' own latents: SD 5.8e-7 (scale 7.5, with or without rescale 0.7),
#     6.5e-7 (scale 1); class-conditional 3.4e-6 (scale 4);
#   whole loop of STEPS steps: SD 2.0e-5 (7.5), 8.9e-6 (7.5 + rescale 0.7), 1.7e-6 (1.0);
#     class-conditional 5.1e-5 (4.0).
# The guided prediction itself is bit-identical (asserted in the class-conditional test). The gap is
# the DDIM step: diffusers keeps alphas_cumprod in float32, and the last steps' 1 - alphabar[0]
# (1e-4 for the class fixture's linear betas) loses up to 6e-4 of its value to that rounding (float32
# spacing near 1 is 6e-8), where engines/ddim.py works in float64; with diffusers' float32 table
# swapped into the numpy sampler, one step agrees to 3.6e-7 (class fixture). The UNet carries
# each step's difference into the next, so the loop's is ~15x one step's.
# Bounds: about 3x the largest measured value.
STEP_REL_TOL = 1e-5
LOOP_REL_TOL = 1.5e-4


def _relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


# ----------------------------------------------------------------------------- arithmetic, exact


def test_combine_is_uncond_plus_scale_times_difference() -> None:
    uncond = np.array([[1.0, -2.0], [0.5, 4.0]], dtype=np.float32)
    cond = np.array([[3.0, -2.0], [1.5, 0.0]], dtype=np.float32)
    out = Guidance(7.5).combine(np.concatenate([uncond, cond]))  # diffusers' layout: [uncond, cond]
    # 1 + 7.5 * 2 = 16; -2 + 0 = -2; 0.5 + 7.5 * 1 = 8; 4 + 7.5 * -4 = -26
    np.testing.assert_array_equal(out, np.array([[16.0, -2.0], [8.0, -26.0]], dtype=np.float32))
    assert out.dtype == np.float32


def test_rescale_matches_hand_computed_values() -> None:
    # sample 0: uncond 0, cond +-1 at scale 3 -> guided +-3, std ratio 1/3 -> rescaled +-1;
    #           phi 0.5 -> 0.5 * 1 + 0.5 * 3 = 2.
    # sample 1: uncond 1, cond (2, 0) -> guided 1 + 3 * (+-1) = (4, -2): std 3 against cond's 1, ratio 1/3,
    #           rescaled (4/3, -2/3); phi 0.5 -> (0.5 * 4/3 + 0.5 * 4, 0.5 * -2/3 + 0.5 * -2) = (8/3, -4/3).
    # The std runs over every non-batch axis (here C, H, W = 1, 2, 2), per sample.
    uncond = np.array([[[[0, 0], [0, 0]]], [[[1, 1], [1, 1]]]], dtype=np.float32)
    cond = np.array([[[[1, -1], [1, -1]]], [[[2, 0], [2, 0]]]], dtype=np.float32)
    out = Guidance(3.0, rescale=0.5).combine(np.concatenate([uncond, cond]))
    expected = np.array([[[[2, -2], [2, -2]]], [[[8 / 3, -4 / 3], [8 / 3, -4 / 3]]]], dtype=np.float32)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=0)
    # the function itself, phi 1: the guided prediction carried to the conditional std exactly
    guided = np.array([[4.0, -2.0, 4.0, -2.0]], dtype=np.float32)
    np.testing.assert_allclose(rescale_noise_cfg(guided, np.array([[2.0, 0.0, 2.0, 0.0]], np.float32), 1.0),
                               [[4 / 3, -2 / 3, 4 / 3, -2 / 3]], rtol=1e-6)
    # phi 0 leaves it unchanged
    np.testing.assert_array_equal(rescale_noise_cfg(guided, np.array([[2.0, 0.0, 2.0, 0.0]], np.float32), 0.0),
                                  guided)


def test_rescale_equals_diffusers_function() -> None:
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg as reference

    rng = np.random.default_rng(1)
    cfg, text = rng.standard_normal((2, 3, 4, 5, 5), dtype=np.float32) * np.float32(3)
    expected = reference(torch.from_numpy(cfg), torch.from_numpy(text), guidance_rescale=0.7).numpy()
    np.testing.assert_allclose(rescale_noise_cfg(cfg, text, 0.7), expected, rtol=1e-6, atol=1e-6)


def test_scale_one_is_no_guidance() -> None:
    guidance = Guidance(1.0, rescale=0.7)  # rescale is inert without guidance, as in diffusers
    assert not guidance.enabled and Guidance(1.0001).enabled
    x = np.ones((2, 4, 8, 8), dtype=np.float32)
    cond = np.zeros((2, 77, 32), dtype=np.float32)
    model_x, conditions = guidance.model_batch(x, cond, None)  # no uncond needed
    assert model_x is x and conditions is cond  # the batch is not doubled
    output = np.arange(8, dtype=np.float32).reshape(2, 4)
    assert guidance.combine(output) is output  # the conditional output as is


def test_doubled_batch_is_uncond_first() -> None:
    x = np.arange(2 * 3, dtype=np.float32).reshape(2, 3)
    cond, uncond = np.array([3, 7]), np.array([10, 10])
    model_x, conditions = Guidance(2.0).model_batch(x, cond, uncond)
    np.testing.assert_array_equal(model_x, np.concatenate([x, x]))
    np.testing.assert_array_equal(conditions, [10, 10, 3, 7])


@pytest.mark.parametrize("scale", [0.99, 0.0, -3.0, float("nan"), float("inf"), True, "7.5", None])
def test_bad_scales_are_refused(scale) -> None:
    with pytest.raises(ConfigError) as info:
        Guidance(scale)
    assert str(info.value) == f"guidance scale must be a finite number >= 1.0 (1.0 turns guidance off), got {scale!r}."


@pytest.mark.parametrize("rescale", [-0.1, 1.5, float("nan")])
def test_bad_rescales_are_refused(rescale) -> None:
    with pytest.raises(ConfigError, match=r"^guidance rescale must be a finite number between 0.0 \(off\) and 1.0, "
                                          rf"got {rescale!r}\.$"):
        Guidance(7.5, rescale=rescale)


def test_mismatched_inputs_are_refused() -> None:
    x = np.zeros((2, 4), dtype=np.float32)
    with pytest.raises(ConfigError, match=r"^the conditions must have one row per sample: got shape \(3, 5\) for 2 "):
        Guidance(2.0).model_batch(x, np.zeros((3, 5)), np.zeros((3, 5)))
    with pytest.raises(ConfigError, match=r"^guidance scale 2.0 needs unconditional conditions"):
        Guidance(2.0).model_batch(x, np.zeros((2, 5)), None)
    with pytest.raises(ConfigError, match=r"^the unconditional conditions must match the conditional ones: got "
                                          r"\(2, 6\) float64 against \(2, 5\) float64\.$"):
        Guidance(2.0).model_batch(x, np.zeros((2, 5)), np.zeros((2, 6)))
    with pytest.raises(EngineError, match=r"odd batch"):
        Guidance(2.0).combine(np.zeros((3, 4), dtype=np.float32))
    sampler = DDIMSampler({})
    with pytest.raises(ConfigError, match=r"^timesteps must be a non-empty, strictly descending list, got \[1, 500\]"):
        guided_ddim(lambda x, t, c: x, sampler, [1, 500], x, np.zeros(2), np.zeros(2), Guidance(2.0))
    with pytest.raises(EngineError, match=r"^the model returned shape \(2, 4\) for an input of shape \(4, 4\) at "
                                          r"timestep 500"):
        guided_ddim(lambda x, t, c: x[:2], sampler, [500], x, np.zeros(2), np.zeros(2), Guidance(2.0))


def test_loop_calls_the_model_on_the_right_batches() -> None:
    """One call per step, doubled only when guiding; the caller's latents are left as they were."""
    calls: list[tuple[tuple[int, ...], int, list[int]]] = []

    def model(x: np.ndarray, t: int, conditions: np.ndarray) -> np.ndarray:
        calls.append((x.shape, t, conditions.tolist()))
        return np.full_like(x, 0.1)

    latents = np.ones((2, 1, 2, 2), dtype=np.float32)
    sampler = DDIMSampler({})
    guided_ddim(model, sampler, [800, 400], latents, np.array([3, 4]), np.array([9, 9]), Guidance(5.0))
    assert calls == [((4, 1, 2, 2), 800, [9, 9, 3, 4]), ((4, 1, 2, 2), 400, [9, 9, 3, 4])]
    calls.clear()
    guided_ddim(model, sampler, [800, 400], latents, np.array([3, 4]), None, Guidance(1.0))
    assert calls == [((2, 1, 2, 2), 800, [3, 4]), ((2, 1, 2, 2), 400, [3, 4])]
    np.testing.assert_array_equal(latents, 1.0)


# ----------------------------------------------------------------------------- against diffusers


@pytest.fixture(scope="module")
def sd_pipeline(sd_pipeline_dir) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(str(sd_pipeline_dir))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("scale, rescale", [(7.5, 0.0), (7.5, 0.7), (1.0, 0.0)])
def test_sd_pipeline_guidance_matches_diffusers(sd_pipeline: StableDiffusionPipeline, scale: float,
                                                rescale: float) -> None:
    pipe = sd_pipeline
    with torch.no_grad():
        cond_t, uncond_t = pipe.encode_prompt(["a red cat", "the 3 dogs"], "cpu", 1, True, negative_prompt=["", ""])
    noise = np.random.default_rng(0).standard_normal((2, 4, SD_LATENT_SIZE, SD_LATENT_SIZE), dtype=np.float32)
    states = [noise]  # the pipeline's latents before each step, and after the last

    def record(_pipe, _i, _t, kwargs):
        states.append(kwargs["latents"].numpy().copy())
        return kwargs

    with torch.no_grad():
        reference = pipe(prompt_embeds=cond_t, negative_prompt_embeds=uncond_t, latents=torch.from_numpy(noise.copy()),
                         num_inference_steps=STEPS, guidance_scale=scale, guidance_rescale=rescale, eta=0.0,
                         output_type="latent", callback_on_step_end=record).images.numpy()
    np.testing.assert_array_equal(states[-1], reference)

    def model(x: np.ndarray, t: int, conditions: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return pipe.unet(torch.from_numpy(x), t, encoder_hidden_states=torch.from_numpy(conditions)).sample.numpy()

    config = dict(pipe.scheduler.config)
    timesteps = ddim_timesteps(config, STEPS)
    np.testing.assert_array_equal(timesteps, pipe.scheduler.timesteps.numpy())  # the grid the pipeline ran
    sampler, guidance = DDIMSampler(config), Guidance(scale, rescale=rescale)
    cond, uncond = cond_t.numpy(), uncond_t.numpy()
    # step by step from the pipeline's own latents: only one step's rounding separates the two
    step_errors = []
    for i, (t, prev_t) in enumerate(zip(timesteps, [*timesteps[1:], -1])):
        model_x, conditions = guidance.model_batch(states[i], cond, uncond)
        ours_step = sampler.step(guidance.combine(model(model_x, int(t), conditions)), int(t), int(prev_t), states[i])
        step_errors.append(_relative_error(ours_step, states[i + 1]))
    # the whole loop on its own: the steps' roundings accumulate through the UNet
    ours = guided_ddim(model, sampler, timesteps, noise, cond, uncond, guidance)
    error = _relative_error(ours, reference)
    print(f"SD scale={scale} rescale={rescale}: one step {max(step_errors):.2e}, loop {error:.2e}")
    assert max(step_errors) < STEP_REL_TOL
    assert error < LOOP_REL_TOL
    # guidance moved the result: the check would fail if the scale (or the rescale) were ignored
    if scale > 1.0:
        unguided = guided_ddim(model, sampler, timesteps, noise, cond, None, Guidance(1.0))
        assert _relative_error(unguided, reference) > 100 * LOOP_REL_TOL
    if rescale > 0.0:
        plain = guided_ddim(model, sampler, timesteps, noise, cond, uncond, Guidance(scale))
        assert _relative_error(plain, reference) > 100 * LOOP_REL_TOL


def test_class_conditional_guidance_matches_diffusers_ddim(class_conditional_dir) -> None:
    folder = class_conditional_dir
    unet = UNet2DModel.from_pretrained(str(folder)).eval()
    scheduler = DDIMScheduler.from_pretrained(str(folder))  # the folder's DDPM config, read as a DDIM one
    scheduler.set_timesteps(STEPS)
    scale = 4.0
    labels = np.array([3, 7], dtype=np.int64)
    null = np.full_like(labels, NULL_CLASS)
    side = unet.config.sample_size
    noise = np.random.default_rng(0).standard_normal((2, unet.config.in_channels, side, side), dtype=np.float32)

    # the reference: diffusers' guidance lines (pipeline_stable_diffusion.py 1037, 1053-1055) over
    # DDIMScheduler.step, in torch; the guided prediction of each step is kept
    latents = torch.from_numpy(noise.copy())
    states, predictions = [noise], []
    with torch.no_grad():
        for t in scheduler.timesteps:
            both = torch.from_numpy(np.concatenate([null, labels]))
            out = unet(torch.cat([latents] * 2), t, class_labels=both).sample
            out_uncond, out_cond = out.chunk(2)
            guided = out_uncond + scale * (out_cond - out_uncond)
            latents = scheduler.step(guided, t, latents, eta=0.0).prev_sample
            predictions.append(guided.numpy())
            states.append(latents.numpy())
    reference = latents.numpy()

    def model(x: np.ndarray, t: int, conditions: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return unet(torch.from_numpy(x), t, class_labels=torch.from_numpy(conditions)).sample.numpy()

    config = dict(scheduler.config)
    timesteps = ddim_timesteps(config, STEPS)
    np.testing.assert_array_equal(timesteps, scheduler.timesteps.numpy())
    sampler, guidance = DDIMSampler(config), Guidance(scale)
    step_errors = []
    for i, (t, prev_t) in enumerate(zip(timesteps, [*timesteps[1:], -1])):
        model_x, conditions = guidance.model_batch(states[i], labels, null)
        prediction = guidance.combine(model(model_x, int(t), conditions))
        np.testing.assert_array_equal(prediction, predictions[i])  # the guidance itself: bit for bit
        step_errors.append(_relative_error(sampler.step(prediction, int(t), int(prev_t), states[i]), states[i + 1]))
    ours = guided_ddim(model, sampler, timesteps, noise, labels, null, guidance)
    error = _relative_error(ours, reference)
    print(f"class-conditional scale={scale}: one step {max(step_errors):.2e}, loop {error:.2e}")
    assert max(step_errors) < STEP_REL_TOL
    assert error < LOOP_REL_TOL
    unguided = guided_ddim(model, sampler, timesteps, noise, labels, None, Guidance(1.0))
    assert _relative_error(unguided, reference) > 100 * LOOP_REL_TOL
