"""Prompts -> CLIP token ids, without torch or transformers (issue 17's `sample --prompt`).

A text-conditioned sampler must tokenise prompts exactly as the pipeline it was compressed from:
StableDiffusionPipeline calls ``tokenizer(prompts, padding="max_length", max_length=77,
truncation=True)``, and a single id off changes the text embedding and so every image. transformers
would drag torch onto a Jetson; its CLIPTokenizer is itself a thin shell around HuggingFace's Rust
`tokenizers` package (transformers 5; the 4.x "fast" tokenizer is the same pipeline), so this module
builds the same `tokenizers` pipeline from the files every SD pipeline folder ships in tokenizer/:
vocab.json and merges.txt (SD 1.5 has no tokenizer.json), with the special tokens of
tokenizer_config.json overridden by special_tokens_map.json, as transformers reads them. The pipeline
(CLIPTokenizer.__init__ in transformers 5.x, value for value):

* normalize: NFC, every whitespace run -> one space, lowercase;
* split on CLIP's regex (its two special tokens, English contractions, letter runs, single digits,
  other-symbol runs), then GPT-2's byte-level alphabet;
* byte-pair merges with `</w>` ending each word and the unknown token for anything outside the vocab;
* BOS + ids + EOS, truncated to `max_length` keeping EOS, right-padded with the pad token.

The pad token is the folder's: `<|endoftext|>` (49407) in SD 1.x, `!` (0) in SD 2.x. The special
tokens are also matched as whole tokens in the prompt text, as transformers does (so SD 2's `!` in a
prompt becomes id 0, not the byte-pair `!</w>`), after lowercasing where the folder's config marks a
token `normalized` (SD 1.5's `<|startoftext|>`: `<|STARTOFTEXT|>` in a prompt is BOS too).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ._lazy import lazy_import
from .errors import ConfigError, EngineDirectoryError

__all__ = ["CLIP_MAX_LENGTH", "TOKENIZER_FILES", "TOKENIZERS_HINT", "ClipTokenizer", "load_clip_tokenizer"]

TOKENIZERS_HINT = "install it with `pip install tokenizers` (HuggingFace's tokenizer library; it needs no torch)"
CLIP_MAX_LENGTH = 77
"""CLIP's context length: every SD prompt is padded / truncated to it (tokenizer_config's model_max_length)."""
TOKENIZER_FILES: tuple[str, ...] = ("vocab.json", "merges.txt")
"""The files a tokenizer folder must hold (SD 1.x / 2.x tokenizer/ folders ship exactly these two + configs)."""
_CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")  # read in this order, later keys win
_CLIP_CLASSES = ("CLIPTokenizer", "CLIPTokenizerFast")
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")  # transformers' SPECIAL_TOKENS_ATTRIBUTES order
_CLIP_SPECIAL = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                 "pad_token": "<|endoftext|>"}
"""transformers' CLIPTokenizer defaults, used for a key no config names."""
_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_UNSET_MAX_LENGTH = 10**6  # transformers writes int(1e30) as model_max_length when a tokenizer has none
_ADDED_TOKEN_FLAGS = ("single_word", "lstrip", "rstrip", "normalized")


class ClipTokenizer:
    """A loaded CLIP tokenizer: call it with prompts for int64 ids [n, max_length].

    Made by load_clip_tokenizer; `bos_id`, `eos_id` and `pad_id` are the folder's special-token ids.
    """

    def __init__(self, backend, *, max_length: int, bos_id: int, eos_id: int, pad_id: int, folder: Path) -> None:
        self._backend = backend
        self.max_length = max_length
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.folder = folder

    def __call__(self, prompts: str | Sequence[str]) -> np.ndarray:
        """Token ids of `prompts` (one prompt or a sequence), int64 [n, max_length].

        Raises:
            ConfigError: a prompt is not text.
        """
        batch = [prompts] if isinstance(prompts, str) else list(prompts)
        for i, prompt in enumerate(batch):
            if not isinstance(prompt, str):
                raise ConfigError(f"prompt {i} is a {type(prompt).__name__}, not text; pass prompts as strings.")
        if not batch:
            return np.zeros((0, self.max_length), dtype=np.int64)
        encodings = self._backend.encode_batch(batch, add_special_tokens=True)
        return np.array([e.ids for e in encodings], dtype=np.int64)

    def __repr__(self) -> str:
        return (f"ClipTokenizer({str(self.folder)!r}, max_length={self.max_length}, bos={self.bos_id}, "
                f"eos={self.eos_id}, pad={self.pad_id})")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EngineDirectoryError(f"tokenizer file {path} is not valid JSON ({exc}); copy the pipeline's "
                                   "tokenizer/ folder again.") from None
    if not isinstance(data, dict):
        raise EngineDirectoryError(f"tokenizer file {path} is not a JSON object; copy the pipeline's tokenizer/ "
                                   "folder again.")
    return data


def _tokenizer_settings(folder: Path) -> dict:
    """tokenizer_config.json then special_tokens_map.json, the later's keys winning (transformers' order)."""
    settings: dict = {}
    for name in _CONFIG_FILES:
        if (folder / name).is_file():
            settings.update(_read_json(folder / name))
    return settings


def _special_token(settings: dict, key: str, folder: Path):
    """(content, AddedToken flags) of one special token: a string, or transformers' AddedToken dict."""
    value = settings.get(key, _CLIP_SPECIAL[key])
    if value is None:
        value = _CLIP_SPECIAL[key]
    if isinstance(value, str):
        return value, {}
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"], {flag: bool(value[flag]) for flag in _ADDED_TOKEN_FLAGS if flag in value}
    raise EngineDirectoryError(f"the {key} in {folder} is {value!r}; it must be a token string (or transformers' "
                               "AddedToken object with a 'content' string).")


def _max_length(settings: dict, max_length: int | None, folder: Path) -> int:
    if max_length is None:
        value = settings.get("model_max_length")
        if value is None or (isinstance(value, (int, float)) and value >= _UNSET_MAX_LENGTH):
            return CLIP_MAX_LENGTH
        if not isinstance(value, int) or isinstance(value, bool):
            raise EngineDirectoryError(f"model_max_length {value!r} in {folder / 'tokenizer_config.json'} is not an "
                                       "integer; it must be CLIP's context length (77 in Stable Diffusion).")
        max_length = value
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2:
        raise ConfigError(f"max_length must be an integer of at least 2 (room for BOS and EOS); got {max_length!r}.")
    return max_length


def load_clip_tokenizer(folder: str | Path, *, max_length: int | None = None) -> ClipTokenizer:
    """The CLIP tokenizer of a pipeline's tokenizer/ folder (module doc), ready to call on prompts.

    Args:
        folder: holds vocab.json and merges.txt, and optionally tokenizer_config.json /
            special_tokens_map.json (special tokens, model_max_length); tokenizer.json is not read.
        max_length: the token axis; default the folder's model_max_length, else CLIP_MAX_LENGTH.

    Raises:
        EngineDirectoryError: the folder or a file is missing or unreadable, the tokenizer is not CLIP's,
            or a special token is not in the vocabulary.
        BackendUnavailableError: the `tokenizers` package is not installed.
    """
    folder = Path(folder)
    what = "copy the pipeline's tokenizer/ folder (vocab.json, merges.txt, tokenizer_config.json)"
    if not folder.is_dir():
        raise EngineDirectoryError(f"tokenizer folder {folder} does not exist; {what}.")
    missing = [name for name in TOKENIZER_FILES if not (folder / name).is_file()]
    if missing:
        raise EngineDirectoryError(f"tokenizer folder {folder} has no {' or '.join(missing)}; {what}.")
    settings = _tokenizer_settings(folder)
    declared = settings.get("tokenizer_class")
    if declared is not None and declared not in _CLIP_CLASSES:
        raise EngineDirectoryError(f"{folder} holds a {declared}; pqcad-deploy tokenises prompts with CLIP's "
                                   f"tokenizer only ({', '.join(_CLIP_CLASSES)}).")
    length = _max_length(settings, max_length, folder)
    special = {key: _special_token(settings, key, folder) for key in _SPECIAL_KEYS}
    vocab = _read_json(folder / "vocab.json")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in vocab.values()):
        raise EngineDirectoryError(f"{folder / 'vocab.json'} must map tokens to non-negative integer ids; copy the "
                                   "pipeline's tokenizer/ folder again.")
    absent = [f"{key} {content!r}" for key, (content, _) in special.items() if content not in vocab]
    if absent:
        raise EngineDirectoryError(f"{folder / 'vocab.json'} lacks the {', '.join(absent)}; the tokenizer's files "
                                   "do not belong together: copy the pipeline's tokenizer/ folder again.")

    tk = lazy_import("tokenizers", TOKENIZERS_HINT)
    try:
        # tokenizers' own reader of the two files (what transformers hands them to), then CLIP's pipeline
        vocab_ids, merges = tk.models.BPE.read_file(str(folder / "vocab.json"), str(folder / "merges.txt"))
        backend = tk.Tokenizer(tk.models.BPE(vocab_ids, merges, dropout=None, continuing_subword_prefix="",
                                             end_of_word_suffix="</w>", fuse_unk=False,
                                             unk_token=special["unk_token"][0]))
    except Exception as exc:  # noqa: BLE001 - the Rust side raises plain Exceptions for bad merges
        raise EngineDirectoryError(f"cannot read {folder / 'vocab.json'} + {folder / 'merges.txt'} as a BPE "
                                   f"vocabulary ({exc}); copy the pipeline's tokenizer/ folder again.") from None
    backend.normalizer = tk.normalizers.Sequence([tk.normalizers.NFC(), tk.normalizers.Replace(tk.Regex(r"\s+"), " "),
                                                  tk.normalizers.Lowercase()])
    backend.pre_tokenizer = tk.pre_tokenizers.Sequence([
        tk.pre_tokenizers.Split(tk.Regex(_CLIP_SPLIT), behavior="removed", invert=True),
        tk.pre_tokenizers.ByteLevel(add_prefix_space=False)])
    # one AddedToken per content; where two keys name the same token (SD 1.5: eos, unk and pad are all
    # <|endoftext|>) the last key's flags hold, in _SPECIAL_KEYS' order, as in transformers' _post_init
    flags_of = {content: flags for content, flags in special.values()}
    backend.add_special_tokens([tk.AddedToken(content, special=True, **{"normalized": False, **flags})
                                for content, flags in flags_of.items()])
    ids = {key: vocab[content] for key, (content, _) in special.items()}
    backend.post_processor = tk.processors.RobertaProcessing(
        (special["eos_token"][0], ids["eos_token"]), (special["bos_token"][0], ids["bos_token"]),
        trim_offsets=False, add_prefix_space=False)
    backend.enable_truncation(max_length=length)
    backend.enable_padding(length=length, pad_id=ids["pad_token"], pad_token=special["pad_token"][0])
    return ClipTokenizer(backend, max_length=length, bos_id=ids["bos_token"], eos_id=ids["eos_token"],
                         pad_id=ids["pad_token"], folder=folder)
