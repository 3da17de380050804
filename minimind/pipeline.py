"""`minimind demo` (the README's first command): the offline pipeline, end to end on CPU.

Runs every stage that exists, in order, on the embedded demo corpus, and prints what each
produced: demo corpus -> validation -> tokenizer -> `demo` model -> self-describing checkpoint
(reloaded strictly) -> MiniMind2 `.pth` and transformers exports (reloaded, logits compared)
-> chat generation through the KV cache. Training stages join this list as they land; until
then the model is freshly initialised, and the demo says so rather than pretending.
"""

from __future__ import annotations

import argparse
import time
from itertools import islice
from pathlib import Path

import torch

from minimind import paths


def _step(title: str) -> float:
    print(f"\n== {title}")
    return time.perf_counter()


def _done(t0: float, text: str) -> None:
    print(f"   {text}  [{time.perf_counter() - t0:.1f}s]")


def run(workdir: Path, seed: int = 0, size_mb: float = 3.0, vocab_size: int = 2048) -> dict:
    """The whole demo under `workdir`; returns the paths and figures it printed."""
    from minimind.checkpoint import load_checkpoint, save_checkpoint
    from minimind.convert.hf import export_hf_folder, load_hf_folder
    from minimind.convert.minimind2 import load_minimind2_pth, save_minimind2_pth
    from minimind.data.check import check_file
    from minimind.data.demo import write_demo_corpus
    from minimind.data.formats import RecordReader
    from minimind.data.texts import iter_texts
    from minimind.infer import generate
    from minimind.model import MiniMindForCausalLM, preset
    from minimind.tokenizer import compression, encode_chat, load_tokenizer, train_tokenizer

    torch.manual_seed(seed)
    result: dict = {}

    t0 = _step("1. demo corpus (deterministic, offline)")
    files = write_demo_corpus(workdir / "dataset", seed=seed, size_mb=size_mb)
    total = sum(p.stat().st_size for p in files.values()) / 1e6
    _done(t0, f"{len(files)} files, {total:.1f} MB in {workdir / 'dataset'}")

    t0 = _step("2. validate every file")
    for path in files.values():
        report = check_file(path, on_error="raise")
        print(f"   {path.name:<22} {report.kind:<10} {report.records:>6} records, 0 bad lines")
    _done(t0, "all files valid")

    t0 = _step(f"3. tokenizer (byte-level BPE, vocabulary {vocab_size})")
    train_files = [files[k] for k in ("pretrain", "sft", "reasoning")]
    texts = list(iter_texts(train_files))
    held_out, train = texts[::100], [t for i, t in enumerate(texts) if i % 100]
    tok_dir = train_tokenizer(train, workdir / "tokenizer", vocab_size, show_progress=False)
    tokenizer = load_tokenizer(tok_dir)
    ratio = compression(tokenizer, held_out)
    result["chars_per_token"] = ratio
    _done(t0, f"{tok_dir}: {ratio:.2f} characters/token on {len(held_out)} held-out texts")

    t0 = _step("4. model (`demo` preset)")
    config = preset("demo", vocab_size=tokenizer.vocab_size)
    model = MiniMindForCausalLM(config).eval()
    _done(t0, f"{config.num_parameters() / 1e6:.2f}M parameters, untrained (no training stage yet)")

    t0 = _step("5. checkpoint: save atomically, reload strictly")
    ckpt = save_checkpoint(workdir / "checkpoints" / "demo", model, tokenizer_dir=tok_dir)
    reloaded, _ = load_checkpoint(ckpt)
    probe = torch.tensor([tokenizer.encode("Mira lives in Stonebridge. 1 + 2 = 3.")])
    with torch.no_grad():
        ref = model(probe).logits
        diff = (reloaded.eval()(probe).logits - ref).abs().max().item()
    result["checkpoint"] = str(ckpt)
    _done(t0, f"{ckpt} (max |logit diff| after reload {diff:.1e})")

    t0 = _step("6. exports: MiniMind2 .pth and a transformers folder, each reloaded")
    pth = workdir / "out" / f"pretrain_{config.hidden_size}.pth"
    save_minimind2_pth(model, pth)
    with torch.no_grad():
        pth_diff = (load_minimind2_pth(pth, 6, 2).eval()(probe).logits - ref).abs().max().item()
    hf_dir = workdir / "out" / "demo-hf"
    arch = export_hf_folder(model, hf_dir, tokenizer_dir=tok_dir)
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        hf_diff = (hf_model(probe).logits - ref).abs().max().item()
        back_diff = (load_hf_folder(hf_dir).eval()(probe).logits - ref).abs().max().item()
    result["hf_max_abs_diff"] = hf_diff
    print(f"   {pth} (fp16): max |logit diff| {pth_diff:.1e}")
    _done(
        t0,
        f"{hf_dir} as {arch}: transformers logits max |diff| {hf_diff:.1e}, "
        f"re-imported {back_diff:.1e}",
    )

    t0 = _step("7. chat generation through the KV cache (batched, greedy)")
    # Held-out questions: fact questions in unseen phrasings, arithmetic on unseen operands.
    held = [RecordReader(files[k]) for k in ("eval_facts", "eval_arith")]
    questions = [r.prompt[-1].content for reader in held for r in islice(reader, 2)]
    prompts = [
        encode_chat(tokenizer, [{"role": "user", "content": q}], add_generation_prompt=True)[0]
        for q in questions
    ]
    start = time.perf_counter()
    outs = generate(model, prompts, max_new_tokens=24, temperature=0.0)
    elapsed = time.perf_counter() - start
    n_tokens = sum(len(o) for o in outs)
    for q, o in zip(questions, outs):
        print(f"   Q: {q}\n   A: {tokenizer.decode(o, skip_special_tokens=True)!r}")
    result["decode_tokens_per_s"] = n_tokens / elapsed
    _done(t0, f"{n_tokens} tokens at {n_tokens / elapsed:.0f} tokens/s (untrained model: noise)")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="minimind demo", description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=paths.home() / "runs" / "demo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size-mb", type=float, default=3.0, help="demo pretrain text size")
    parser.add_argument("--vocab-size", type=int, default=2048)
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    run(args.workdir, args.seed, args.size_mb, args.vocab_size)
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f}s; everything is in {args.workdir}")
    return 0
