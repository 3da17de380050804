"""`minimind demo` (the README's first command): the offline pipeline, end to end on CPU.

Runs every stage that exists, in order, on the embedded demo corpus, and prints what each
produced: demo corpus -> validation -> tokenizer -> token shards -> pretrain -> SFT (both
through the one training engine) -> the checkpoint reloaded strictly -> MiniMind2 `.pth` and
transformers exports (reloaded, logits compared) -> accuracy, beside its chance level, on
questions asked as training asks them (memorisation) and on held-out ones (unseen phrasings of
the world's facts, unseen arithmetic), with sample answers -> DPO (held-out preference
accuracy, abstaining on people it was never told about, facts kept) -> GRPO (arithmetic on
the RL operand pairs and on held-out ones) -> reasoning distillation (the share of held-out
replies in the think/answer layout), each measured before and after. Knowledge distillation
(a smaller student) is measured by bench/distill.py: two more trainings would not fit the
demo's ten minutes.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from minimind import paths


def _step(title: str) -> float:
    print(f"\n== {title}")
    return time.perf_counter()


def _done(t0: float, text: str) -> None:
    print(f"   {text}  [{time.perf_counter() - t0:.1f}s]")


@dataclass
class Recipe:
    """The demo's data and training budget (every field a `minimind demo` flag).

    A 2M-parameter model on 2 cores is limited by optimizer steps, not tokens: for the same
    tokens and time, 8 windows of 128 tokens per step reach a much lower loss than 32 of 256,
    and facts are stored only after several epochs (bench/RESULTS.md, "The demo recipe").
    """

    size_mb: float = 3.0  # demo pretrain text; the other files scale with it
    vocab_size: int = 2048
    split_digits: bool = True  # numbers encode digit by digit (tokenizer/train.py)
    cjk_chunk: int = 2  # no token spans more Chinese characters (0: off; tokenizer/train.py)
    seq_len: int = 256  # SFT rows (longer conversations are truncated)
    pretrain_seq_len: int = 128  # packed windows; demo texts are under 512 characters
    pretrain_epochs: int = 3
    pretrain_batch: int = 8
    pretrain_lr: float = 3e-3
    sft_epochs: int = 3
    sft_batch: int = 8
    sft_lr: float = 1e-3
    dpo_epochs: int = 2
    dpo_batch: int = 8
    dpo_lr: float = 5e-4
    dpo_beta: float = 0.1
    # the chosen reply's NLL beside the DPO loss (RPO): without it the SFT model, which never
    # abstained, wins the stranger pairs on log-ratios without ever preferring the abstention
    dpo_rpo_alpha: float = 2.0
    grpo_steps: int = 128
    grpo_prompts: int = 8  # per step, each sampled grpo_generations times
    grpo_generations: int = 8
    grpo_lr: float = 5e-5
    reason_epochs: int = 2
    reason_lr: float = 5e-4


def run(
    workdir: Path,
    seed: int = 0,
    recipe: Recipe | None = None,
    max_steps: int | None = None,
    eval_limit: int | None = None,
) -> dict:
    """The whole demo under `workdir`; returns the paths and figures it printed."""
    import json

    from minimind.checkpoint import load_checkpoint
    from minimind.convert.hf import export_hf_folder, load_hf_folder
    from minimind.convert.minimind2 import load_minimind2_pth, save_minimind2_pth
    from minimind.data.check import check_file
    from minimind.data.demo import write_demo_corpus
    from minimind.data.formats import RecordReader
    from minimind.data.prepare import prepare
    from minimind.data.texts import iter_texts
    from minimind.eval.tasks import answer_accuracy, chance_level, preference_accuracy
    from minimind.model import MiniMindForCausalLM, preset
    from minimind.tokenizer import compression, load_tokenizer, train_tokenizer
    from minimind.train.config import TrainConfig
    from minimind.train.engine import Trainer
    from minimind.train.stages.dpo import DPOStage
    from minimind.train.stages.grpo import GRPOStage
    from minimind.train.stages.pretrain import PretrainStage
    from minimind.train.stages.reason import ReasonStage
    from minimind.train.stages.sft import SFTStage

    r = recipe or Recipe()
    torch.manual_seed(seed)
    result: dict = {}

    t0 = _step("1. demo corpus (deterministic, offline)")
    files = write_demo_corpus(workdir / "dataset", seed=seed, size_mb=r.size_mb)
    total = sum(p.stat().st_size for p in files.values()) / 1e6
    _done(t0, f"{len(files)} files, {total:.1f} MB in {workdir / 'dataset'}")

    t0 = _step("2. validate every file")
    for path in files.values():
        report = check_file(path, on_error="raise")
        print(f"   {path.name:<26} {report.kind:<10} {report.records:>6} records, 0 bad lines")
    _done(t0, "all files valid")

    t0 = _step(f"3. tokenizer (byte-level BPE, vocabulary {r.vocab_size})")
    train_files = [files[k] for k in ("pretrain", "sft", "reasoning")]
    texts = list(iter_texts(train_files))
    held_out, train = texts[::100], [t for i, t in enumerate(texts) if i % 100]
    tok_dir = train_tokenizer(
        train,
        workdir / "tokenizer",
        r.vocab_size,
        show_progress=False,
        split_digits=r.split_digits,
        cjk_chunk=r.cjk_chunk,
    )
    tokenizer = load_tokenizer(tok_dir)
    ratio = compression(tokenizer, held_out)
    result["chars_per_token"] = ratio
    _done(t0, f"{tok_dir}: {ratio:.2f} characters/token on {len(held_out)} held-out texts")

    t0 = _step("4. token shards (pre-tokenized once; chat data with assistant-only loss masks)")
    shards = {}
    for kind in ("pretrain", "sft", "dpo", "rlaif", "reasoning"):
        shards[kind] = workdir / "shards" / kind
        report = prepare(files[kind], tok_dir, shards[kind], max_seq_len=r.seq_len)
        print(f"   {kind:<9} {report.tokens:>9,} tokens in {report.docs:,} documents")
    _done(t0, f"shards in {workdir / 'shards'}")

    config = preset("demo", vocab_size=tokenizer.vocab_size)
    model = MiniMindForCausalLM(config)
    print(f"\n   model: `demo` preset, {config.num_parameters() / 1e6:.2f}M parameters")
    # bf16 for fixed-length packed pretraining (about 1.9x fp32 on this class of CPU); fp32
    # for variable-length SFT, where CPU bf16 attention backward is slower than fp32
    # (bench/RESULTS.md).
    for name, stage, epochs, batch, lr, dtype in (
        ("pretrain", PretrainStage(shards["pretrain"], r.pretrain_seq_len), r.pretrain_epochs,
         r.pretrain_batch, r.pretrain_lr, "bf16"),
        ("sft", SFTStage(shards["sft"], r.seq_len), r.sft_epochs, r.sft_batch, r.sft_lr, "fp32"),
    ):  # fmt: skip
        t0 = _step(f"5{'ab'[name == 'sft']}. {name} ({epochs} epoch(s), the one training engine)")
        train_config = TrainConfig(
            out_dir=str(workdir / "checkpoints" / name),
            epochs=epochs,
            max_steps=max_steps,
            batch_size=batch,
            learning_rate=lr,
            warmup_ratio=0.02,
            dtype=dtype,
            log_interval=25,
            save_interval=0,
            seed=seed,
        )
        trainer = Trainer(train_config, stage, model, tokenizer_dir=tok_dir)
        trainer.fit()
        model = trainer.model
        ckpt = trainer.export(
            workdir / "out" / f"{'full_sft' if name == 'sft' else name}_{config.hidden_size}"
        )
        _done(t0, f"{trainer.step} steps, eval loss {trainer.evaluate()['eval_loss']:.3f}; {ckpt}")
    model.eval()

    t0 = _step("6. checkpoint: reload strictly")
    reloaded, _ = load_checkpoint(ckpt)
    probe = torch.tensor([tokenizer.encode("Mira lives in Stonebridge. 1 + 2 = 3.")])
    with torch.no_grad():
        ref = model(probe).logits
        diff = (reloaded.eval()(probe).logits - ref).abs().max().item()
    result["checkpoint"] = str(ckpt)
    _done(t0, f"{ckpt} (max |logit diff| after reload {diff:.1e})")

    t0 = _step("7. exports: MiniMind2 .pth and a transformers folder, each reloaded")
    pth = workdir / "out" / f"full_sft_{config.hidden_size}.pth"
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

    def ask(task: str, model, tag: str = "") -> float:
        rows = [json.loads(line) for line in files[task].read_text("utf-8").splitlines()]
        chance = chance_level(rows)  # over the whole file, also when `eval_limit` cuts it
        records = list(RecordReader(files[task]))[:eval_limit]
        acc = answer_accuracy(model, tokenizer, records, max_new_tokens=24)
        result[f"{task}{tag}_accuracy"] = acc.value
        # Abstaining has one right reply per language: no guessing baseline to show.
        note = "abstains" if task == "eval_strangers" else f"chance {100 * chance:.1f}%"
        if task != "eval_strangers":
            result[f"{task}_chance"] = chance
        print(
            f"   {task:<19} {acc.correct:>4}/{acc.total:<4} correct ({100 * acc.value:5.1f}%, "
            f"{note})"
        )
        if task in ("eval_facts", "eval_arith", "eval_strangers") and not tag:
            for question, answer, gold, ok in acc.samples[:2]:
                print(
                    f"     Q: {question}\n     A: {answer}  [gold {gold}: {'ok' if ok else 'wrong'}]"
                )
        return acc.value

    def prefer(model, tag: str) -> float:
        rows = [json.loads(line) for line in files["eval_dpo"].read_text("utf-8").splitlines()]
        records = list(RecordReader(files["eval_dpo"]))[:eval_limit]
        acc = preference_accuracy(model, tokenizer, records)
        parts = []
        for kind in ("stranger", "fact"):
            oks = [ok for ok, row in zip(acc.oks, rows, strict=False) if row["kind"] == kind]
            parts.append(f"{kind} {sum(oks)}/{len(oks)}")
        result[f"eval_dpo{tag}_accuracy"] = acc.value
        print(
            f"   eval_dpo            {acc.correct:>4}/{acc.total:<4} pairs prefer the chosen reply "
            f"({100 * acc.value:5.1f}%; {', '.join(parts)})"
        )
        return acc.value

    t0 = _step("8. questions: trained phrasings and operand pairs, then held-out ones")
    for task in ("eval_facts_trained", "eval_facts", "eval_arith_trained", "eval_arith"):
        ask(task, model)
    print(f"   chat with it:  minimind chat --load_from {ckpt}")
    print(f"   serve it:      minimind serve --load_from {ckpt}   (OpenAI API on 127.0.0.1:8998)")
    _done(t0, f"in a browser:  minimind web --load_from {ckpt}")

    def train(name: str, stage, steps: int | None, epochs: int, batch: int, lr: float, model):
        train_config = TrainConfig(
            out_dir=str(workdir / "checkpoints" / name),
            epochs=epochs,
            max_steps=steps if max_steps is None else min(steps or max_steps, max_steps),
            batch_size=batch,
            learning_rate=lr,
            min_lr_ratio=1.0 if name == "grpo" else 0.1,
            dtype="fp32",
            log_interval=25,
            save_interval=0,
            eval_interval=0,
            seed=seed,
        )
        trainer = Trainer(train_config, stage, model.train(), tokenizer_dir=tok_dir)
        trainer.fit()
        out = trainer.export(workdir / "out" / f"{name}_{config.hidden_size}")
        return stage.export_model(trainer.model).eval(), trainer, out

    t0 = _step("9. DPO from the SFT model: held-out preference pairs, strangers, facts kept")
    print("   before:")
    before = (prefer(model, "_before"), ask("eval_strangers", model, "_before"))
    dpo = DPOStage(
        shards["dpo"], r.seq_len, beta=r.dpo_beta, rpo_alpha=r.dpo_rpo_alpha, max_eval=64
    )
    model, trainer, ckpt = train("dpo", dpo, None, r.dpo_epochs, r.dpo_batch, r.dpo_lr, model)
    print("   after:")
    after = (prefer(model, ""), ask("eval_strangers", model), ask("eval_facts", model, "_dpo"))
    print(
        f"   preference accuracy {100 * before[0]:.1f}% -> {100 * after[0]:.1f}%, abstaining on "
        f"strangers {100 * before[1]:.1f}% -> {100 * after[1]:.1f}%, held-out facts "
        f"{100 * result['eval_facts_accuracy']:.1f}% -> {100 * after[2]:.1f}%"
    )
    _done(t0, f"{trainer.step} steps; {ckpt}")

    t0 = _step("10. GRPO from the DPO model: arithmetic on the RL pairs, then held-out pairs")
    print("   before:")
    rl_before = ask("eval_arith_rl", model, "_before")
    held_before = ask("eval_arith", model, "_dpo")
    grpo = GRPOStage(
        shards["rlaif"],
        num_generations=r.grpo_generations,
        max_gen_len=24,
        beta=0.0,
        reward="answer:1",
        max_eval=16,
    )
    model, trainer, ckpt = train("grpo", grpo, r.grpo_steps, 100, r.grpo_prompts, r.grpo_lr, model)
    print("   after:")
    rl_after, held_after = ask("eval_arith_rl", model), ask("eval_arith", model, "_grpo")
    print(
        f"   RL pairs {100 * rl_before:.1f}% -> {100 * rl_after:.1f}%, held-out pairs "
        f"{100 * held_before:.1f}% -> {100 * held_after:.1f}%"
    )
    _done(t0, f"{trainer.step} steps; {ckpt}")

    t0 = _step("11. reasoning distillation: <think>/<answer> replies, the tags weighted")
    reason = ReasonStage(shards["reasoning"], r.seq_len, eval_prompts=eval_limit or 32, max_eval=64)
    before = _format_rate(reason, model, tok_dir)
    model, trainer, ckpt = train("reason", reason, None, r.reason_epochs, 8, r.reason_lr, model)
    after = trainer.evaluate()
    result["reason_format_rate_before"] = before["eval_format_rate"]
    result["reason_format_rate"] = after["eval_format_rate"]
    print(
        f"   held-out replies in the <think>/<answer> layout: "
        f"{100 * before['eval_format_rate']:.1f}% -> {100 * after['eval_format_rate']:.1f}% "
        f"(answer block equal to the reference's: {100 * before['eval_answer_match']:.1f}% -> "
        f"{100 * after['eval_answer_match']:.1f}%)"
    )
    print(f"   chat with it:  minimind chat --load_from {ckpt} --enable_thinking 1")
    _done(t0, f"{trainer.step} steps; {ckpt}")
    return result


def _format_rate(stage, model, tok_dir: Path) -> dict:
    """The reasoning stage's evaluation of `model` before it trains (a throwaway engine set-up:
    the stage's evaluation samples through the engine's policy handle)."""
    from minimind.train.config import TrainConfig
    from minimind.train.engine import Trainer

    config = TrainConfig(out_dir=str(tok_dir.parent / "checkpoints" / "probe"))
    probe = Trainer(config, stage, model, tokenizer_dir=tok_dir)
    probe._build()  # nothing is written: the probe never trains or saves
    return probe.evaluate()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="minimind demo", description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=paths.home() / "runs" / "demo")
    parser.add_argument("--seed", type=int, default=0)
    for f in fields(Recipe):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            parser.add_argument(flag, type=int, choices=(0, 1), default=int(f.default))
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default)
    parser.add_argument("--max-steps", type=int, default=None, help="cap each stage (smoke runs)")
    args = parser.parse_args(argv)
    recipe = Recipe(**{f.name: type(f.default)(getattr(args, f.name)) for f in fields(Recipe)})
    t0 = time.perf_counter()
    run(args.workdir, args.seed, recipe, max_steps=args.max_steps)
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f}s; everything is in {args.workdir}")
    return 0
