"""Torch-free CLIP tokenisation (engines/tokenizer.py), pinned to transformers' CLIPTokenizer.

The reference is StableDiffusionPipeline's own call, ``tokenizer(prompts, padding="max_length",
max_length=77, truncation=True).input_ids``, on three tokenizer folders:

* the SD-1.5-shaped pipeline of tests/_pipelines.py (as StableDiffusionPipeline.save_pretrained wrote it;
  its 76-token vocabulary has letters and digits only, so punctuation and accents become the unknown token);
* a CLIP byte-level vocabulary written here (GPT-2's 256 byte symbols alone and with `</w>`, merges for
  a few words, CLIP's two special tokens last, as in openai/clip-vit-large-patch14), in SD 1.5's folder
  form: vocab.json + merges.txt + tokenizer_config.json with AddedToken objects + special_tokens_map.json,
  no tokenizer.json; so punctuation, accents, CJK and emoji go through real byte-level BPE;
* the same vocabulary in SD 2.x's form, whose pad token is `!` (id 0).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pqcad_deploy.engines.errors import BackendUnavailableError, ConfigError, EngineDirectoryError
from pqcad_deploy.engines.tokenizer import CLIP_MAX_LENGTH, load_clip_tokenizer


ROOT = Path(__file__).resolve().parents[2]

PROMPTS = [
    "",
    "the",
    "a photo of an astronaut riding a horse on mars",
    "Hello, World!!! Is this... punctuation?! (yes) -- #1 @home $5 100%",
    "MiXeD CaSe PHOTO of The Astronaut",
    "café naïve Zürich 東京 🚀 ☃ ﬁne",  # accents, CJK, emoji, a ligature NFC keeps
    "it's a dog's life, they'll say we'd've",  # CLIP's contraction rule
    "  tabs\tand\nnew lines   and runs of   spaces  ",
    "digits 12345 and 3.14159",
    "<|startoftext|> special tokens <|endoftext|> in the text",
    "<|ENDOFTEXT|> upper-case <|StartOfText|>",  # matched only where a token is "normalized" (SD 1.5's BOS)
    "!",
    "photo " * 100,  # 100 words: truncated to 77 ids, EOS kept
    "a" * 300,  # one long word of repeated merges
]
_WORDS = ("photo", "astronaut", "riding", "horse", "mars", "the", "hello", "world", "of", "an", "on")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet CLIP's vocab.json starts with."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def _write_byte_level_tokenizer(folder: Path, pad_token: str) -> Path:
    """CLIP's vocabulary layout at a small size (module doc)."""
    symbols = list(_bytes_to_unicode().values())
    tokens = [*symbols, *(s + "</w>" for s in symbols)]
    merges: list[tuple[str, str]] = []
    for word in _WORDS:  # merge each word left to right: ('p','h'), ('ph','o'), ..., ('phot','o</w>')
        left = word[0]
        for k, char in enumerate(word[1:], start=1):
            right = char + ("</w>" if k == len(word) - 1 else "")
            if (left, right) not in merges:
                merges.append((left, right))
                tokens.append(left + right)
            left += right
    for pair in (("a", "a"), ("aa", "aa"), ("aaaa", "aaaa"), ("a", "a</w>")):  # so a run of one letter merges
        if pair not in merges:
            merges.append(pair)
            tokens.append("".join(pair))
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")

    def added(content: str) -> dict:  # how SD 1.5's tokenizer_config.json writes its special tokens
        return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True, "rstrip": False,
                "single_word": False}

    (folder / "tokenizer_config.json").write_text(json.dumps({
        "add_prefix_space": False, "bos_token": added("<|startoftext|>"), "do_lower_case": True,
        "eos_token": added("<|endoftext|>"), "errors": "replace", "model_max_length": 77, "pad_token": pad_token,
        "tokenizer_class": "CLIPTokenizer", "unk_token": added("<|endoftext|>")}), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": {"content": "<|startoftext|>", "lstrip": False, "normalized": True, "rstrip": False,
                      "single_word": False},
        "eos_token": {"content": "<|endoftext|>", "lstrip": False, "normalized": True, "rstrip": False,
                      "single_word": False},
        "pad_token": pad_token,
        "unk_token": {"content": "<|endoftext|>", "lstrip": False, "normalized": True, "rstrip": False,
                      "single_word": False}}), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory, sd_pipeline_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    return {"sd_pipeline": sd_pipeline_dir / "tokenizer",
            "sd15_bytes": _write_byte_level_tokenizer(root / "sd15", "<|endoftext|>"),
            "sd2_bytes": _write_byte_level_tokenizer(root / "sd2", "!")}


def _transformers_ids(folder: Path, prompts: list[str]) -> np.ndarray:
    from transformers import CLIPTokenizer

    reference = CLIPTokenizer.from_pretrained(str(folder))
    return np.array(reference(prompts, padding="max_length", max_length=77, truncation=True).input_ids)


@pytest.mark.parametrize("name", ["sd_pipeline", "sd15_bytes", "sd2_bytes"])
def test_ids_equal_transformers_clip_tokenizer(folders, name) -> None:
    ids = load_clip_tokenizer(folders[name])(PROMPTS)
    expected = _transformers_ids(folders[name], PROMPTS)
    assert ids.dtype == np.int64 and ids.shape == (len(PROMPTS), 77) == expected.shape
    for prompt, ours, theirs in zip(PROMPTS, ids, expected):
        assert ours.tolist() == theirs.tolist(), prompt


def test_the_prompts_exercise_bpe_unknowns_truncation_and_padding(folders) -> None:
    """The comparison above is not vacuous: merges apply, bytes and unknowns occur, 77 is reached."""
    vocab = json.loads((folders["sd15_bytes"] / "vocab.json").read_text(encoding="utf-8"))
    ids = load_clip_tokenizer(folders["sd15_bytes"])(PROMPTS)
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    assert ids[0, :3].tolist() == [bos, eos, eos]  # empty prompt: BOS, EOS, padding
    assert ids[2, 1:4].tolist() == [vocab["a</w>"], vocab["photo</w>"], vocab["of</w>"]]  # whole-word merges
    assert ids[3, 1:3].tolist() == [vocab["hello</w>"], vocab[",</w>"]]  # lowercased, comma split off
    assert ids[5, 1:4].tolist() == [vocab["c"], vocab["a"], vocab["f"]]  # "café" as bytes: c a f Ã ©</w>
    assert ids[5, 4:6].tolist() == [vocab["Ã"], vocab["©</w>"]]
    upper = ids[PROMPTS.index("<|ENDOFTEXT|> upper-case <|StartOfText|>")].tolist()
    assert upper[1] == vocab["<"] and upper[upper.index(eos) - 1] == bos  # BOS is "normalized" in SD 1.5, EOS not
    long_row = ids[PROMPTS.index("photo " * 100)]
    assert long_row[0] == bos and long_row[-1] == eos and set(long_row[1:-1].tolist()) == {vocab["photo</w>"]}
    fixture = load_clip_tokenizer(folders["sd_pipeline"])(["hello, world"])[0]
    unk = json.loads((folders["sd_pipeline"] / "vocab.json").read_text(encoding="utf-8"))["<|endoftext|>"]
    assert fixture[6] == unk  # the fixture's vocabulary has no ",": the unknown token (CLIP's unk is EOS)


def test_pad_token_is_the_folders(folders) -> None:
    """SD 1.x pads with <|endoftext|> (the EOS id), SD 2.x with "!" (id 0, the first byte symbol); in SD 2 a
    "!" in the prompt is the special token too (id 0), not the byte-pair "!</w>"."""
    sd15, sd2 = load_clip_tokenizer(folders["sd15_bytes"]), load_clip_tokenizer(folders["sd2_bytes"])
    vocab = json.loads((folders["sd2_bytes"] / "vocab.json").read_text(encoding="utf-8"))
    assert (sd15.bos_id, sd15.eos_id, sd15.pad_id) == (vocab["<|startoftext|>"], vocab["<|endoftext|>"],
                                                       vocab["<|endoftext|>"])
    assert (sd2.bos_id, sd2.eos_id, sd2.pad_id) == (vocab["<|startoftext|>"], vocab["<|endoftext|>"], 0)
    assert sd15(["the"])[0, :5].tolist() == [sd15.bos_id, vocab["the</w>"], sd15.eos_id, sd15.eos_id, sd15.eos_id]
    assert sd2(["the"])[0, :5].tolist() == [sd2.bos_id, vocab["the</w>"], sd2.eos_id, 0, 0]
    assert sd15(["!"])[0, 1] == vocab["!</w>"] and sd2(["!"])[0, 1] == 0


def test_call_forms_and_max_length(folders) -> None:
    tokenizer = load_clip_tokenizer(folders["sd15_bytes"])
    assert tokenizer.max_length == CLIP_MAX_LENGTH == 77  # tokenizer_config's model_max_length
    assert tokenizer("the cat").tolist() == tokenizer(["the cat"]).tolist()  # one string is one prompt
    empty = tokenizer([])
    assert empty.shape == (0, 77) and empty.dtype == np.int64
    short = load_clip_tokenizer(folders["sd15_bytes"], max_length=4)(["photo photo photo", ""])
    assert short.tolist() == [[tokenizer.bos_id, tokenizer(["photo"])[0, 1], tokenizer(["photo"])[0, 1],
                               tokenizer.eos_id], [tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id,
                                                   tokenizer.pad_id]]
    with pytest.raises(ConfigError, match=r"^prompt 1 is a int, not text; pass prompts as strings\.$"):
        tokenizer(["fine", 7])
    with pytest.raises(ConfigError, match=r"^max_length must be an integer of at least 2 \(room for BOS and EOS\); "
                                          r"got 1\.$"):
        load_clip_tokenizer(folders["sd15_bytes"], max_length=1)


def _copy(folder: Path, to: Path) -> Path:
    to.mkdir()
    for path in folder.iterdir():
        (to / path.name).write_bytes(path.read_bytes())
    return to


def test_a_missing_or_garbled_folder_is_one_clear_error(folders, tmp_path) -> None:
    source = folders["sd15_bytes"]
    hint = r"copy the pipeline's tokenizer/ folder \(vocab\.json, merges\.txt, tokenizer_config\.json\)\.$"
    with pytest.raises(EngineDirectoryError, match=rf"^tokenizer folder {tmp_path}/nowhere does not exist; {hint}"):
        load_clip_tokenizer(tmp_path / "nowhere")
    no_merges = _copy(source, tmp_path / "no_merges")
    (no_merges / "merges.txt").unlink()
    with pytest.raises(EngineDirectoryError, match=rf"^tokenizer folder {no_merges} has no merges\.txt; {hint}"):
        load_clip_tokenizer(no_merges)
    garbled = _copy(source, tmp_path / "garbled")
    (garbled / "vocab.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(EngineDirectoryError, match=rf"^tokenizer file {garbled}/vocab\.json is not valid JSON "):
        load_clip_tokenizer(garbled)
    bad_merge = _copy(source, tmp_path / "bad_merge")
    with (bad_merge / "merges.txt").open("a", encoding="utf-8") as f:
        f.write("zq xj\n")  # tokens not in vocab.json
    with pytest.raises(EngineDirectoryError, match=rf"^cannot read {bad_merge}/vocab\.json \+ {bad_merge}/merges\.txt "
                                                   r"as a BPE vocabulary \(.*zq.*\); copy the pipeline's"):
        load_clip_tokenizer(bad_merge)
    no_pad = _copy(source, tmp_path / "no_pad")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        config = json.loads((no_pad / name).read_text(encoding="utf-8"))
        (no_pad / name).write_text(json.dumps({**config, "pad_token": "<pad>"}), encoding="utf-8")
    with pytest.raises(EngineDirectoryError, match=rf"^{no_pad}/vocab\.json lacks the pad_token '<pad>'; the "
                                                   r"tokenizer's files do not belong together"):
        load_clip_tokenizer(no_pad)
    t5 = _copy(source, tmp_path / "t5")
    config = json.loads((t5 / "tokenizer_config.json").read_text(encoding="utf-8"))
    (t5 / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "T5Tokenizer"}),
                                             encoding="utf-8")
    with pytest.raises(EngineDirectoryError, match=rf"^{t5} holds a T5Tokenizer; pqcad-deploy tokenises prompts with "
                                                   r"CLIP's tokenizer only \(CLIPTokenizer, CLIPTokenizerFast\)\.$"):
        load_clip_tokenizer(t5)


_BLOCKER = r"""
import sys
sys.path.insert(0, "tests")
from _boundaries import is_pytorch_stage
BLOCKED = set(sys.argv[2].split(",")) if sys.argv[2] else set()

class Block:
    def find_spec(self, name, path=None, target=None):
        if is_pytorch_stage(name) or name.split(".")[0] in BLOCKED:
            raise ImportError(f"blocked by the test: {name}")
        return None

sys.meta_path.insert(0, Block())
from pqcad_deploy.engines.errors import EngineError
from pqcad_deploy.engines.tokenizer import load_clip_tokenizer
try:
    print(load_clip_tokenizer(sys.argv[1])(["a photo of the cat", ""]).tolist())
except EngineError as exc:
    print(f"{type(exc).__name__}: {exc}")
print(sorted(k for k in sys.modules if k.split(".")[0] in {"torch", "transformers", "diffusers"}
             or is_pytorch_stage(k)))
"""


def _blocked_run(folder: Path, blocked: str) -> list[str]:
    proc = subprocess.run([sys.executable, "-c", _BLOCKER, str(folder), blocked], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()


def test_tokenises_with_torch_and_transformers_unimportable(folders) -> None:
    """engines/tokenizer.py needs neither torch nor transformers nor the PyTorch stage: with all of them
    blocked it still gives the same ids, and none of them is loaded."""
    ids, loaded = _blocked_run(folders["sd15_bytes"], "torch,transformers,diffusers")
    expected = load_clip_tokenizer(folders["sd15_bytes"])(["a photo of the cat", ""]).tolist()
    assert json.loads(ids) == expected
    assert loaded == "[]"


def test_without_the_tokenizers_package_the_error_says_how_to_install_it(folders) -> None:
    message, _ = _blocked_run(folders["sd15_bytes"], "tokenizers,torch,transformers")
    assert message == ("BackendUnavailableError: tokenizers is not installed on this machine: blocked by the test: "
                       "tokenizers; install it with `pip install tokenizers` (HuggingFace's tokenizer library; "
                       "it needs no torch).")
    assert BackendUnavailableError.__name__ in message
