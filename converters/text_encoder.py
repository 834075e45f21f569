"""A text-conditioned pipeline's CLIP text encoder as ONNX: token ids -> the UNet's encoder_hidden_states.

StableDiffusionPipeline tokenises each prompt to CLIP's context length (77, padded and truncated) and
feeds the UNet ``text_encoder(input_ids)[0]``, the last hidden state after CLIP's final layer norm, with
no attention mask (SD 1.x / 2.x text encoders set none). The graph written here is exactly that, in
float32: `input_ids` int64 [batch, 77] -> `encoder_hidden_states` float32 [batch, 77, D], the batch
axis dynamic so that guidance can encode the prompts and the empty prompt in one call. The ids come
from engines.tokenizer, without torch.

The encoder runs once per prompt, not once per step, so FP16 or quantization would save little; it
stays float32. Parity (text_encoder_parity): ONNX Runtime on the CPU against transformers in float32
on the same seeded ids, as the relative L2 error, within TEXT_ENCODER_PARITY_TOLERANCE.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pqcad_deploy.engines.parts import TEXT_ENCODER_IO
from pqcad_deploy.converters.pipeline_parts import (PART_OPSET, PartParity, export_part, part_parity,
                                                    read_part_metadata, set_value_shape)
from pqcad_deploy.errors import ExportError
from pqcad_deploy.latent_parts import load_text_encoder_model as load_text_encoder  # re-exported

__all__ = ["ENCODER_HIDDEN_STATES_OUTPUT", "INPUT_IDS_INPUT", "TEXT_ENCODER_KIND", "TEXT_ENCODER_PARITY_TOLERANCE",
           "TextEncoderExport", "export_text_encoder", "load_text_encoder", "text_encoder_parity"]

TEXT_ENCODER_KIND = "text_encoder"
"""The part's `kind` in the ONNX metadata (converters.pipeline_parts.PART_METADATA_KEY)."""
INPUT_IDS_INPUT, ENCODER_HIDDEN_STATES_OUTPUT = TEXT_ENCODER_IO  # the names the engines feed and read
TEXT_ENCODER_PARITY_TOLERANCE = 1e-5
"""Relative L2 of the ONNX hidden states against transformers' on the same ids. Measured on the
SD-1.5-shaped test pipeline (tests/_pipelines.py, seeds 0-9, batch 3): at most 2.8e-7. The tolerance
is the UNet export's for float outputs (converters.parity.EXACT_REL_TOL); an export bug (a missing
layer norm, a wrong causal mask) moves the states by tens of percent."""


@dataclass(frozen=True)
class TextEncoderExport:
    """What export_text_encoder wrote."""

    path: Path
    opset: int
    max_length: int  # the token axis: CLIP's context length (77)
    hidden_size: int  # D, the UNet's cross_attention_dim
    vocab_size: int
    size_bytes: int


class _TextEncoderForExport(nn.Module):
    """input_ids -> text_encoder(input_ids).last_hidden_state (StableDiffusionPipeline's prompt_embeds)."""

    def __init__(self, text_encoder: nn.Module) -> None:
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids).last_hidden_state


def export_text_encoder(pipeline_dir: Path | str, out_path: Path | str, *,
                        overwrite: bool = False) -> TextEncoderExport:
    """Write `pipeline_dir`/text_encoder as ONNX: `input_ids` int64 [batch, 77] -> `encoder_hidden_states`.

    Raises:
        ModelLoadError: see load_text_encoder. ExportError: a graph onnx.checker rejects.
        OutputPathError: `out_path` cannot be written (converters.pipeline_parts.export_part).
    """
    model = load_text_encoder(pipeline_dir)
    config = model.config
    length = int(config.max_position_embeddings)
    example = (torch.zeros(2, length, dtype=torch.long),)  # batch 2: nothing batch-1-specific is traced
    metadata = {"kind": TEXT_ENCODER_KIND, "precision": "fp32", "max_length": length,
                "hidden_size": int(config.hidden_size), "vocab_size": int(config.vocab_size)}
    hidden = int(config.hidden_size)

    def fixed_shapes(onnx_model) -> None:
        set_value_shape(onnx_model, INPUT_IDS_INPUT, ["batch", length])
        set_value_shape(onnx_model, ENCODER_HIDDEN_STATES_OUTPUT, ["batch", length, hidden])

    path = export_part(_TextEncoderForExport(model), example, out_path, input_names=[INPUT_IDS_INPUT],
                       output_names=[ENCODER_HIDDEN_STATES_OUTPUT], metadata=metadata, overwrite=overwrite,
                       rewrite=fixed_shapes)
    return TextEncoderExport(path=path, opset=PART_OPSET, max_length=length, hidden_size=int(config.hidden_size),
                             vocab_size=int(config.vocab_size), size_bytes=path.stat().st_size)


def _seeded_ids(batch: int, length: int, vocab_size: int, bos: int, eos: int, pad: int, seed: int) -> np.ndarray:
    """Prompt-shaped ids: BOS, a seeded number of seeded tokens, EOS, then padding (as the tokenizer writes)."""
    rng = np.random.default_rng(seed)
    ids = np.full((batch, length), pad, dtype=np.int64)
    for row in range(batch):
        n = int(rng.integers(0, length - 1))  # 0 .. length - 2 prompt tokens
        ids[row, 0] = bos
        ids[row, 1:n + 1] = rng.integers(0, vocab_size, n)
        ids[row, n + 1] = eos
    return ids


def text_encoder_parity(pipeline_dir: Path | str, onnx_path: Path | str, *, batch: int = 2, seed: int = 0,
                        tolerance: float = TEXT_ENCODER_PARITY_TOLERANCE) -> PartParity:
    """ONNX Runtime (CPU) against ``text_encoder(input_ids).last_hidden_state`` in float32.

    Args:
        batch, seed: `batch` rows of ids shaped like tokenised prompts (_seeded_ids: BOS, random
            tokens of any id, EOS, padding with the config's pad id) from numpy's default_rng(seed).
    """
    from pqcad_deploy.engines.ort_session import ort_session

    meta = read_part_metadata(onnx_path)
    if meta.get("kind") != TEXT_ENCODER_KIND:
        raise ExportError(f"{onnx_path} is not a text encoder ONNX written by pqcad-deploy (its metadata: {meta}).")
    model = load_text_encoder(pipeline_dir)
    c = model.config
    pad = c.pad_token_id if c.pad_token_id is not None else c.eos_token_id
    ids = _seeded_ids(batch, int(c.max_position_embeddings), int(c.vocab_size), int(c.bos_token_id),
                      int(c.eos_token_id), int(pad), seed)
    with torch.no_grad():
        reference = model(torch.from_numpy(ids)).last_hidden_state.numpy()
    states = ort_session(onnx_path).run([ENCODER_HIDDEN_STATES_OUTPUT], {INPUT_IDS_INPUT: ids})[0]
    return part_parity(TEXT_ENCODER_KIND, "fp32", states, reference, tolerance)
