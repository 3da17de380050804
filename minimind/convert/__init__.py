"""Conversion between MiniMind models and other formats; the only package that imports transformers.

minimind2.py  MiniMind2 `.pth` state dicts and MiniMind2 transformers folders (model_type
              "minimind"): read without transformers, shapes inferred, strict loads
hf.py         native transformers folders (Llama, Qwen3, Mixtral, Qwen2-MoE, Qwen3-MoE), both
              ways; transformers is imported only inside its functions
gguf.py       GGUF files for llama.cpp (llama, qwen3, bailingmoe, qwen3moe): weights, q/k permutation,
              tokenizer, chat template; gguf is imported only inside its functions
ollama.py     an Ollama folder: model.gguf and a Modelfile with the chat format as a Go template
cli.py        `scripts/convert_model.py` and `minimind convert`: main(argv)
export_cli.py `minimind export hf|gguf|ollama`: convert with the format word as --to
"""

from .gguf import export_gguf, gguf_architecture
from .hf import (
    ConversionError,
    config_from_hf,
    export_hf_folder,
    hf_architecture,
    hf_config,
    load_hf_folder,
    model_from_hf,
    to_hf_model,
)
from .minimind2 import (
    infer_config_from_state_dict,
    load_minimind2_folder,
    load_minimind2_pth,
    save_minimind2_pth,
)
from .ollama import export_ollama

__all__ = [
    "ConversionError",
    "config_from_hf",
    "export_gguf",
    "export_hf_folder",
    "export_ollama",
    "gguf_architecture",
    "hf_architecture",
    "hf_config",
    "infer_config_from_state_dict",
    "load_hf_folder",
    "load_minimind2_folder",
    "load_minimind2_pth",
    "model_from_hf",
    "save_minimind2_pth",
    "to_hf_model",
]
