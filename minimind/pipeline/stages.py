"""The pipeline's stages, in order, each a function of the run that returns its report entry.

Owns `STEPS` and `Run` (what the stages share: the workdir, the recipe, the tokenizer, the
measurements, one way to train through the engine). Each stage reads its inputs from the
folders of the stages it depends on (checkpoints are reloaded from disk, so a stage reused from
an earlier run feeds the next one exactly as if it had just run) and returns
{metrics, curves, artifacts (paths relative to the workdir), steps, tokens, tokens_per_s,
notes, samples}. Every model is measured on the held-out files after its stage; a stage's
"before" is its starting model's figure (minimind.pipeline.measure).

demo corpus (validated) -> tokenizer -> shards -> pretrain -> SFT, then branches from the SFT
model as MiniMind lays them out: a LoRA identity, DPO, GRPO (-> reasoning distillation), and
knowledge distillation into a smaller student; exports of the chat model (GRPO's: transformers,
GGUF, .pth) reloaded and compared -> sample chats.

GRPO starts from SFT, as MiniMind's RL scripts and our `minimind train grpo` do, not from DPO:
DPO sharpens the SFT model towards its likelier answers, which halves how often it samples the
column method (15% -> 7%, run Z in bench/RESULTS.md), and GRPO from there gained 6 held-out
points; from SFT it gains 10-40 (runs W0-W2).
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import torch

from minimind.pipeline.measure import Measures, curves, loss_metric
from minimind.pipeline.recipe import Recipe
from minimind.pipeline.runner import Step

TRAIN_TASKS = ("facts_trained", "facts", "arith_trained", "arith")
SAVE_EVERY = 500  # optimizer steps between step checkpoints: where a killed stage resumes
EVAL_POINTS = 8  # held-out evaluations per LM stage (the report's eval curve)


class Run:
    """What the stages share."""

    def __init__(
        self,
        workdir: Path,
        recipe: Recipe,
        seed: int,
        runner,
        display,
        limits: dict,
        save_every: int | None = None,
    ):
        self.workdir, self.recipe, self.seed = workdir, recipe, seed
        self.runner, self.display = runner, display
        self.max_steps, self.eval_limit = limits.get("max_steps"), limits.get("eval_limit")
        self.save_every = save_every or SAVE_EVERY
        self.resuming = False
        self.fit_seconds = 0.0
        self._tokenizer = None
        self._measures: Measures | None = None

    # ------------------------------------------------------------------ shared inputs
    @property
    def files(self) -> dict[str, Path]:
        from minimind.data.demo import FILE_NAMES

        return {k: self.workdir / "dataset" / name for k, name in FILE_NAMES.items()}

    @property
    def tok_dir(self) -> Path:
        return self.workdir / "tokenizer"

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from minimind.tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer(self.tok_dir)
        return self._tokenizer

    def shards(self, kind: str) -> Path:
        return self.workdir / "shards" / kind

    @property
    def measures(self) -> Measures:
        if self._measures is None:
            store = self.runner.state.setdefault("measures", {})
            self._measures = Measures(
                self.workdir / "dataset", self.tokenizer, store, self.eval_limit
            )
        return self._measures

    def model_name(self, stage: str) -> str:
        """The name measurements of a stage's model are kept under: its input key, so a stage
        that reruns with other inputs is measured afresh."""
        return f"{stage}@{self.runner.keys[stage]}"

    def rel(self, path: Path) -> str:
        return str(Path(path).relative_to(self.workdir))

    def load(self, stage: str):
        from minimind.checkpoint import load_checkpoint

        model, _ = load_checkpoint(
            self.workdir / self.runner.result(stage)["artifacts"]["checkpoint"]
        )
        return model.eval()

    @property
    def cuda(self) -> bool:
        return torch.cuda.is_available()

    # ------------------------------------------------------------------ training
    def train(
        self,
        name: str,
        stage,
        model,
        *,
        epochs: int,
        batch: int,
        lr: float,
        steps: int | None = None,
        dtype: str = "fp32",
        warmup: float = 0.02,
        min_lr_ratio: float = 0.1,
        out_name: str | None = None,
        run_name: str | None = None,
    ):
        """Train `model` with `stage` through the engine under checkpoints/RUN_NAME (step
        checkpoints every `save_every` steps, resumed after an interruption), export it to
        out/OUT_NAME; returns (the export form of the model, the trainer, the export path)."""
        from minimind.train.config import TrainConfig
        from minimind.train.engine import Trainer

        if self.max_steps is not None:
            steps = min(steps or self.max_steps, self.max_steps)
        run_dir = self.workdir / "checkpoints" / (run_name or name)
        config = TrainConfig(
            out_dir=str(run_dir),
            epochs=epochs,
            max_steps=steps,
            batch_size=batch,
            learning_rate=lr,
            warmup_ratio=warmup,
            min_lr_ratio=min_lr_ratio,
            dtype="bf16" if self.cuda else dtype,
            log_interval=25 if self.max_steps is None else 5,
            save_interval=self.save_every,
            keep_last=1,
            eval_interval=0,
            seed=self.seed,
            resume=True,
        )
        trainer = Trainer(config, stage, model.train(), tokenizer_dir=self.tok_dir)
        if stage.count_is_tokens:
            # about EVAL_POINTS held-out evaluations over the run (the report's eval curve)
            planned = epochs * len(stage.train_dataset()) // batch
            planned = min(planned, steps) if steps is not None else planned
            trainer.config.eval_interval = max(1, planned // EVAL_POINTS)
        with self.display.listening():
            t0 = time.perf_counter()
            trainer.fit()
            self.fit_seconds = time.perf_counter() - t0
        out = trainer.export(
            self.workdir / "out" / f"{out_name or name}_{model.config.hidden_size}"
        )
        return stage.export_model(trainer.model).eval(), trainer, out

    def probe(self, stage, model) -> dict:
        """The stage's own evaluation of `model` before it trains (a throwaway engine set-up:
        nothing is written, the model is not changed)."""
        from minimind.train.config import TrainConfig
        from minimind.train.engine import Trainer

        config = TrainConfig(out_dir=str(self.workdir / "checkpoints" / "probe"), batch_size=8)
        trainer = Trainer(config, stage, model, tokenizer_dir=self.tok_dir)
        trainer._build()
        return trainer.evaluate()

    def trained(self, trainer, stage, run_name: str) -> dict:
        """The engine-side part of a training stage's report entry (tokens/s over the
        training loop of this process: a resumed stage counts its samples since the resume)."""
        entry = {
            "steps": trainer.step,
            "curves": curves(self.workdir / "checkpoints" / run_name),
            "tokens": None,
            "tokens_per_s": None,
        }
        if stage.count_is_tokens:
            tokens = _dataset_tokens(stage, trainer)
            entry["tokens"] = tokens
            if self.fit_seconds:
                entry["tokens_per_s"] = tokens / self.fit_seconds
        return entry


def _dataset_tokens(stage, trainer) -> int:
    """Tokens the stage fed the model: samples seen times the mean length of a training row
    (rows of one length when packed; exact for whole epochs of variable-length rows)."""
    dataset = stage.train_dataset()
    lengths = getattr(dataset, "lengths", None)
    if lengths is None or len(lengths) == 0:
        return int(trainer.samples_seen * stage.seq_len())
    mean = float(sum(int(n) for n in lengths)) / len(lengths)
    return round(trainer.samples_seen * mean)


def _timed(fn):
    import time

    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


# ---------------------------------------------------------------------- data stages
def corpus(run: Run) -> dict:
    from minimind.data.check import check_file
    from minimind.data.demo import write_demo_corpus

    files = write_demo_corpus(run.workdir / "dataset", seed=run.seed, size_mb=run.recipe.size_mb)
    digest = hashlib.sha256()
    notes = []
    for path in files.values():
        report = check_file(path, on_error="raise")
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
        notes.append(f"{path.name}: {report.kind}, {report.records} records, 0 bad lines")
        print(f"   {path.name:<26} {report.kind:<10} {report.records:>6} records, 0 bad lines")
    total = sum(p.stat().st_size for p in files.values()) / 1e6
    print(f"   {len(files)} files, {total:.1f} MB, every file valid")
    return {
        "artifacts": {"dataset": "dataset"},
        "data_hash": digest.hexdigest()[:16],
        "notes": notes,
        "metrics": [],
    }


def tokenizer(run: Run) -> dict:
    from minimind.data.texts import iter_texts
    from minimind.tokenizer import compression, load_tokenizer, train_tokenizer

    r, files = run.recipe, run.files
    texts = list(iter_texts([files[k] for k in ("pretrain", "sft", "reasoning")]))
    held_out, train = texts[::100], [t for i, t in enumerate(texts) if i % 100]
    tok_dir = train_tokenizer(
        train,
        run.tok_dir,
        r.vocab_size,
        show_progress=False,
        split_digits=r.split_digits,
        cjk_chunk=r.cjk_chunk,
    )
    ratio = compression(load_tokenizer(tok_dir), held_out)
    print(f"   {tok_dir}: {ratio:.2f} characters/token on {len(held_out)} held-out texts")
    metric = {
        "name": "chars_per_token",
        "label": "characters per token (byte-level BPE)",
        "split": "held-out",
        "before": 1.0,  # before merges: one byte per token, at most one character
        "after": ratio,
        "unit": "ratio",
        "chance": None,
        "n": len(held_out),
    }
    return {"artifacts": {"tokenizer": "tokenizer"}, "metrics": [metric]}


def shards(run: Run) -> dict:
    from minimind.data.prepare import prepare

    notes, total = [], 0
    for kind in ("pretrain", "sft", "lora", "dpo", "rlaif", "reasoning"):
        report = prepare(
            run.files[kind], run.tok_dir, run.shards(kind), max_seq_len=run.recipe.seq_len
        )
        total += report.tokens
        line = f"{report.tokens:,} tokens in {report.docs:,} documents"
        if report.untrained:  # e.g. the calculator chats, longer than seq_len before a reply
            line += f" ({report.untrained} dropped: no reply token within {run.recipe.seq_len})"
        notes.append(f"{kind}: {line}")
        print(f"   {kind:<9} {line}")
    return {"artifacts": {"shards": "shards"}, "tokens": total, "notes": notes, "metrics": []}


# ---------------------------------------------------------------------- pretrain and SFT
def pretrain(run: Run) -> dict:
    from minimind.model import MiniMindForCausalLM, preset
    from minimind.train.stages.pretrain import PretrainStage

    r = run.recipe
    config = preset(r.preset, vocab_size=run.tokenizer.vocab_size)

    def initial():
        torch.manual_seed(run.seed)
        return MiniMindForCausalLM(config)

    print(f"   model: `{r.preset}` preset, {config.num_parameters() / 1e6:.2f}M parameters")
    stage = PretrainStage(run.shards("pretrain"), r.pretrain_seq_len)
    before = run.probe(PretrainStage(run.shards("pretrain"), r.pretrain_seq_len), initial())
    # bf16 for fixed-length packed pretraining (about 1.9x fp32 on this class of CPU)
    model, trainer, ckpt = run.train(
        "pretrain", stage, initial(), epochs=r.pretrain_epochs, batch=r.pretrain_batch,
        lr=r.pretrain_lr, dtype="bf16",
    )  # fmt: skip
    after = trainer.evaluate()
    metrics = [
        loss_metric("eval_loss", "next-token loss", before["eval_loss"], after["eval_loss"]),
        *run.measures.compare(
            ("perplexity",), f"init@{run.runner.keys['pretrain']}", initial(),
            run.model_name("pretrain"), model,
        ),
    ]  # fmt: skip
    _print_metrics(metrics)
    return {
        **run.trained(trainer, stage, "pretrain"),
        "metrics": metrics,
        "artifacts": {"checkpoint": run.rel(ckpt)},
        "parameters": config.num_parameters(),
    }


def sft(run: Run) -> dict:
    from minimind.train.stages.sft import SFTStage

    r = run.recipe
    start = run.load("pretrain")
    stage = SFTStage(run.shards("sft"), r.seq_len)
    before_loss = run.probe(SFTStage(run.shards("sft"), r.seq_len), start)["eval_loss"]
    # fp32: on CPU, bf16 attention backward over variable-length rows is slower than fp32
    model, trainer, ckpt = (run.train(
            "sft", stage, start, epochs=r.sft_epochs, batch=r.sft_batch, lr=r.sft_lr,
            out_name="full_sft",
        )
    )  # fmt: skip
    start = run.load("pretrain")
    metrics = run.measures.compare(
        (*TRAIN_TASKS, "arith_rl", "perplexity"),
        run.model_name("pretrain"),
        start,
        run.model_name("sft"),
        model,
    )
    after_loss = trainer.evaluate()["eval_loss"]
    metrics.append(loss_metric("eval_loss", "loss on held-out replies", before_loss, after_loss))
    _print_metrics(metrics)
    return {
        **run.trained(trainer, stage, "sft"),
        "metrics": metrics,
        "artifacts": {"checkpoint": run.rel(ckpt)},
        "samples": _samples(run, "sft", ("facts", "arith")),
    }


def lora(run: Run) -> dict:
    from minimind.adapter import WEIGHTS_NAME
    from minimind.model.lora import LoRAConfig
    from minimind.train.stages.lora import LoRAStage

    r = run.recipe
    stage = LoRAStage(
        run.shards("lora"), r.seq_len, LoRAConfig(r=r.lora_rank, alpha=2.0 * r.lora_rank)
    )
    model, trainer, ckpt = (run.train(
            "lora", stage, run.load("sft"), epochs=r.lora_epochs, batch=8, lr=r.lora_lr,
            out_name="lora_identity",
        )
    )  # fmt: skip
    metrics = run.measures.compare(
        ("identity", "facts"),
        run.model_name("sft"),
        run.load("sft"),
        run.model_name("lora"),
        model,
    )
    _print_metrics(metrics)
    return {
        **run.trained(trainer, stage, "lora"),
        "metrics": metrics,
        "artifacts": {
            "checkpoint": run.rel(ckpt),
            "adapter": run.rel(ckpt / WEIGHTS_NAME),
        },
        "notes": [f"rank {r.lora_rank} adapters on the SFT model; the export has them merged"],
        "samples": _samples(run, "lora", ("identity",)),
    }


# ---------------------------------------------------------------------- preference and RL
def dpo(run: Run) -> dict:
    from minimind.train.stages.dpo import DPOStage
    from minimind.train.stages.sft import SFTStage

    r = run.recipe
    replay = run.shards("sft") if r.dpo_replay_alpha else None
    stage = DPOStage(
        run.shards("dpo"), r.seq_len, beta=r.dpo_beta, rpo_alpha=r.dpo_rpo_alpha, max_eval=64,
        replay=replay, replay_alpha=r.dpo_replay_alpha,
    )  # fmt: skip
    model, trainer, ckpt = run.train(
        "dpo", stage, run.load("sft"), epochs=r.dpo_epochs, batch=r.dpo_batch, lr=r.dpo_lr
    )
    tasks = ("dpo", "strangers", "facts", "arith")
    metrics = run.measures.compare(
        tasks, run.model_name("sft"), run.load("sft"), run.model_name("dpo"), model
    )
    # what DPO costs the chat model: the loss on SFT's held-out conversations (before: the
    # figure the SFT stage recorded for its model on the same rows)
    sft_eval = SFTStage(run.shards("sft"), r.seq_len)
    before = next(
        m["after"] for m in run.runner.result("sft")["metrics"] if m["name"] == "eval_loss"
    )
    row = loss_metric(
        "sft_loss", "held-out SFT loss", before, run.probe(sft_eval, model)["eval_loss"]
    )
    metrics.append({**row, "n": len(sft_eval.eval_dataset())})
    _print_metrics(metrics)
    by_kind = run.measures.score(run.model_name("dpo"), model, "dpo").get("by_kind", {})
    return {
        **run.trained(trainer, stage, "dpo"),
        "metrics": metrics,
        "artifacts": {"checkpoint": run.rel(ckpt)},
        "notes": [f"held-out pairs preferred after DPO, by kind: {by_kind}"],
        "samples": _samples(run, "dpo", ("strangers",)),
    }


def grpo(run: Run) -> dict:
    from minimind.train.stages.grpo import GRPOStage

    r = run.recipe
    stage = GRPOStage(
        run.shards("rlaif"),
        num_generations=r.grpo_generations,
        max_gen_len=64,  # the column method takes up to 56 tokens (demo_world.worked)
        beta=0.0,
        reward="answer:1",
        max_eval=16,
    )
    model, trainer, ckpt = (run.train(
            "grpo", stage, run.load("sft"), steps=r.grpo_steps, epochs=100, batch=r.grpo_prompts,
            lr=r.grpo_lr, min_lr_ratio=1.0,
        )
    )  # fmt: skip
    tasks = ("arith_rl", "arith", "facts")
    metrics = run.measures.compare(
        tasks, run.model_name("sft"), run.load("sft"), run.model_name("grpo"), model
    )
    _print_metrics(metrics)
    entry = run.trained(trainer, stage, "grpo")
    entry["curves"].update(curves(run.workdir / "checkpoints" / "grpo", {"reward": "reward"}))
    return {
        **entry,
        "metrics": metrics,
        "artifacts": {"checkpoint": run.rel(ckpt)},
        "notes": [
            f"{r.grpo_prompts} prompts x {r.grpo_generations} completions a step, answer reward"
        ],
        "samples": _samples(run, "grpo", ("arith",)),
    }


def reason(run: Run) -> dict:
    from minimind.train.stages.reason import ReasonStage

    r = run.recipe

    def make():
        return ReasonStage(
            run.shards("reasoning"), r.seq_len, eval_prompts=run.eval_limit or 32, max_eval=64
        )

    start = run.load("grpo")
    before = run.probe(make(), start)
    stage = make()
    _, trainer, ckpt = run.train(
        "reason", stage, start, epochs=r.reason_epochs, batch=8, lr=r.reason_lr
    )
    after = trainer.evaluate()
    n = min(len(stage.eval_dataset()), stage.eval_prompts)
    metrics = [
        _ratio("format_rate", "replies in the <think>/<answer> layout", before, after, n),
        _ratio("answer_match", "answer block equal to the reference's", before, after, n),
        loss_metric(
            "eval_loss",
            "tag-weighted loss on held-out replies",
            before["eval_loss"],
            after["eval_loss"],
        ),
    ]
    _print_metrics(metrics)
    return {
        **run.trained(trainer, stage, "reason"),
        "metrics": metrics,
        "artifacts": {"checkpoint": run.rel(ckpt)},
    }


def _ratio(key: str, label: str, before: dict, after: dict, n) -> dict:
    return {
        "name": key,
        "label": label,
        "split": "held-out",
        "before": before.get(f"eval_{key}"),
        "after": after.get(f"eval_{key}"),
        "unit": "accuracy",
        "chance": None,
        "n": n,
    }


def distill(run: Run) -> dict:
    from minimind.model import MiniMindForCausalLM, preset
    from minimind.train.stages.distill import DistillStage
    from minimind.train.stages.sft import SFTStage

    r = run.recipe

    def student():
        torch.manual_seed(run.seed)
        kv = max(1, r.student_heads // 2)
        config = preset(
            r.preset,
            vocab_size=run.tokenizer.vocab_size,
            hidden_size=r.student_hidden,
            num_hidden_layers=r.student_layers,
            num_attention_heads=r.student_heads,
            num_key_value_heads=kv,
        )
        return MiniMindForCausalLM(config)

    teacher = run.workdir / run.runner.result("sft")["artifacts"]["checkpoint"]
    shards_sft = run.shards("sft")
    alone = SFTStage(shards_sft, r.seq_len)
    distilled = DistillStage(
        shards_sft,
        r.seq_len,
        teacher=teacher,
        alpha=r.distill_alpha,
        temperature=r.distill_temperature,
    )
    kw = {"epochs": r.distill_epochs, "batch": 8, "lr": r.distill_lr}
    m_alone, t_alone, ckpt_alone = run.train(
        "student_alone", alone, student(), out_name="student_sft", **kw
    )
    m_kd, t_kd, ckpt_kd = run.train(
        "distill", distilled, student(), out_name="student_distilled", **kw
    )
    # one held-out split and one plain CE for both students (the SFT stage's eval rows)
    ce = [run.probe(alone, m)["eval_loss"] for m in (m_alone, m_kd)]
    metrics = [loss_metric("held_out_ce", "student: CE on held-out replies", ce[0], ce[1])]
    metrics += run.measures.compare(
        ("facts", "arith"),
        run.model_name("distill") + ":alone",
        m_alone,
        run.model_name("distill") + ":distilled",
        m_kd,
    )
    _print_metrics(metrics, ("labels alone", "distilled"))
    entry = run.trained(t_kd, distilled, "distill")
    entry["curves"]["train (labels alone)"] = curves(run.workdir / "checkpoints" / "student_alone")[
        "train"
    ]
    return {
        **entry,
        "metrics": metrics,
        "artifacts": {"checkpoint": run.rel(ckpt_kd), "student_sft": run.rel(ckpt_alone)},
        "notes": [
            f"student: hidden {r.student_hidden}, {r.student_layers} layers, "
            f"{m_kd.config.num_parameters() / 1e6:.2f}M parameters, from scratch on the SFT file; "
            f"'before' = the same student trained on the labels alone ({t_alone.step} steps), "
            f"'after' = distilled from the SFT model (alpha {r.distill_alpha}, "
            f"T {r.distill_temperature}, {t_kd.step} steps)"
        ],
    }


# ---------------------------------------------------------------------- exports and chats
def export(run: Run) -> dict:
    """The chat model (after GRPO) as a transformers folder, a GGUF file and a MiniMind2 .pth,
    each read back and compared with the checkpoint."""
    import gguf
    import numpy as np

    from minimind.convert.gguf import export_gguf, gguf_tensors
    from minimind.convert.hf import export_hf_folder, load_hf_folder
    from minimind.convert.minimind2 import load_minimind2_pth, save_minimind2_pth

    model = run.load("grpo")
    cfg = model.config
    probe = torch.tensor([run.tokenizer.encode("Mira lives in Stonebridge. 1 + 2 = 3.")])
    with torch.no_grad():
        ref = model(probe).logits
    out = run.workdir / "out"
    hf_dir = out / "chat-hf"
    arch = export_hf_folder(model, hf_dir, tokenizer_dir=run.tok_dir)
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    pth = out / f"chat_{cfg.hidden_size}.pth"
    save_minimind2_pth(model, pth)
    gguf_path = out / "chat-f32.gguf"
    gguf_arch = export_gguf(model, gguf_path, run.tok_dir, dtype="f32")
    stored = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(gguf_path).tensors}
    expected = gguf_tensors(model, gguf_arch)
    gguf_diff = max(
        float(np.abs(stored[k].reshape(-1) - v.float().numpy().reshape(-1)).max())
        for k, v in expected.items()
    )
    with torch.no_grad():
        hf_diff = (hf_model(probe).logits - ref).abs().max().item()
        back_diff = (load_hf_folder(hf_dir).eval()(probe).logits - ref).abs().max().item()
        pth_model = load_minimind2_pth(pth, cfg.num_attention_heads, cfg.num_key_value_heads)
        pth_diff = (pth_model.eval()(probe).logits - ref).abs().max().item()

    def row(name, label, value):
        return {"name": name, "label": label, "split": None, "before": None, "after": value,
                "unit": "max |diff|", "chance": None, "n": None}  # fmt: skip

    metrics = [
        row("hf_logits", f"transformers {arch}: logits vs ours", hf_diff),
        row("hf_reimport", "transformers folder re-imported: logits", back_diff),
        row("pth_logits", "MiniMind2 .pth (fp16) re-read: logits", pth_diff),
        row("gguf_tensors", f"GGUF f32 ({gguf_arch}) re-read: every tensor", gguf_diff),
    ]
    for m in metrics:
        print(f"   {m['label']:<45} max |diff| {m['after']:.1e}")
    from minimind.eval.lm_eval_tasks import write_lm_eval_tasks

    tasks_dir = run.workdir / "lm_eval_tasks"
    names = write_lm_eval_tasks(run.workdir / "dataset", tasks_dir, limit=run.eval_limit)
    print(f"   lm-evaluation-harness tasks ({', '.join(names)}) in {tasks_dir}")
    return {
        "metrics": metrics,
        "artifacts": {
            "transformers": run.rel(hf_dir),
            "gguf": run.rel(gguf_path),
            "pth": run.rel(pth),
            "lm_eval_tasks": run.rel(tasks_dir),
        },
        "notes": [
            "llama.cpp itself is not run here (llama-cpp-python is an opt-in extra); the GGUF "
            "tensors are compared after reading the file back"
        ],
    }


CHATS = {
    "grpo": ("Who are you?", "What is 12 + 7?", "Where does Mira live?", "你好！"),
    "lora": ("Who are you?",),
}


def chat(run: Run) -> dict:
    """A few replies of the chat model (after GRPO), the LoRA identity and the reasoning model
    (thinking on: its reasoning shown apart from the answer)."""
    samples = []
    for stage, prompts in CHATS.items():
        model = run.load(stage)
        for prompt in prompts:
            samples.append({"stage": stage, "prompt": prompt, "reply": _reply(run, model, prompt)})
    model = run.load("reason")
    question = "Mira has 3 apples and buys 4 more. How many apples does she have?"
    samples.append(
        {"stage": "reason", "prompt": question, "reply": _reply(run, model, question, True)}
    )
    for s in samples:
        print(f"   [{s['stage']}] > {s['prompt']}\n     {s['reply']}")
    return {"metrics": [], "samples": samples}


def _reply(run: Run, model, prompt: str, thinking: bool = False) -> str:
    from minimind.infer import generate
    from minimind.infer.chat import prompt_ids, split_reasoning

    ids = prompt_ids(run.tokenizer, [{"role": "user", "content": prompt}], enable_thinking=thinking)
    (out,) = generate(
        model, [ids], max_new_tokens=96, temperature=0.0, stop_token_ids=[run.tokenizer.eos_id]
    )
    reasoning, answer = split_reasoning(run.tokenizer.decode(out, skip_special_tokens=True))
    return answer if reasoning is None else f"[thinking] {reasoning} [answer] {answer}"


def _samples(run: Run, stage: str, tasks) -> list[dict]:
    store = run.measures.store
    out = []
    for task in tasks:
        for s in store.get(f"{run.model_name(stage)}:{task}", {}).get("samples", [])[:2]:
            gold = f"  [gold {s['gold']}: {'right' if s['ok'] else 'wrong'}]" if "gold" in s else ""
            out.append({"stage": stage, "prompt": s["prompt"], "reply": s["reply"] + gold})
    return out


def _print_metrics(metrics: list[dict], sides: tuple[str, str] = ("before", "after")) -> None:
    def show(v, unit):
        if v is None:
            return "-"
        return f"{100 * v:5.1f}%" if unit == "accuracy" else f"{v:.4f}"

    for m in metrics:
        extra = f" (chance {100 * m['chance']:.1f}%)" if m.get("chance") is not None else ""
        n = f", n={m['n']}" if m.get("n") else ""
        print(
            f"   {m['label']:<44} [{m['split'] or '-'}] {sides[0]} {show(m['before'], m['unit'])} -> "
            f"{sides[1]} {show(m['after'], m['unit'])}{extra}{n}"
        )


STEPS: list[Step] = [
    Step("corpus", "demo corpus, written and validated", corpus, (), ("dataset",)),
    Step("tokenizer", "tokenizer (byte-level BPE)", tokenizer, ("corpus",), ("tokenizer",)),
    Step("shards", "token shards", shards, ("tokenizer",), ("shards",)),
    Step("pretrain", "pretraining", pretrain, ("shards",), ("checkpoints/pretrain",)),
    Step("sft", "supervised fine-tuning (SFT)", sft, ("pretrain",), ("checkpoints/sft",)),
    Step("lora", "LoRA: a new identity on the SFT model", lora, ("sft",), ("checkpoints/lora",)),
    Step("dpo", "DPO from the SFT model", dpo, ("sft",), ("checkpoints/dpo",)),
    Step(
        "grpo", "GRPO from the SFT model (arithmetic reward)", grpo, ("sft",), ("checkpoints/grpo",)
    ),
    Step(
        "reason",
        "reasoning distillation (<think>/<answer>)",
        reason,
        ("grpo",),
        ("checkpoints/reason",),
    ),
    Step(
        "distill",
        "knowledge distillation into a smaller student",
        distill,
        ("sft",),
        ("checkpoints/student_alone", "checkpoints/distill"),
    ),
    Step("export", "exports of the chat model, read back", export, ("grpo",), ("out/chat-hf",)),
    Step("chat", "sample chats", chat, ("grpo", "lora", "reason")),
]
