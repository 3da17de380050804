"""minimind.convert: MiniMind2 .pth and folders, transformers export/import, and numerical parity.

Parity: a tiny random model (fp32; weights and norm gains non-trivial) is exported, reloaded with
plain `AutoModelForCausalLM.from_pretrained` (no remote code) and compared with ours on a full
sequence, a left-padded batch, prefill + 20 cached decode steps (max |diff| <= 1e-4) and 30
greedy tokens (identical), for every architecture route, MoE in eval mode, YaRN past its
original context. Round trips .pth -> ours -> HF -> ours must be bit-identical.
"""

import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from minimind.checkpoint import CheckpointError
from minimind.convert import (
    ConversionError,
    export_hf_folder,
    hf_architecture,
    infer_config_from_state_dict,
    load_hf_folder,
    load_minimind2_pth,
    save_minimind2_pth,
    to_hf_model,
)
from minimind.convert.cli import main as convert_main
from minimind.model import MINIMIND2_YARN, MiniMindForCausalLM, preset
from tests import REPO

transformers = pytest.importorskip("transformers")

TOL = 1e-4
# YaRN past its original context (32 tokens; sequences up to 100). theta 1e4 makes the ramp
# between the correction bounds fractional at head_dim 16.
YARN = dict(
    rope_theta=1e4,
    max_position_embeddings=128,
    rope_scaling={"factor": 4.0, "original_max_position_embeddings": 32},
)
CASES = {  # name -> (overrides of the tiny preset, expected transformers architecture)
    "dense": ({}, "LlamaForCausalLM"),
    "qk_norm": (dict(qk_norm=True), "Qwen3ForCausalLM"),
    "moe": (dict(use_moe=True, n_shared_experts=0), "MixtralForCausalLM"),
    "moe_shared": (dict(use_moe=True, n_shared_experts=2), "Qwen2MoeForCausalLM"),
    "moe_unnormalised": (
        dict(use_moe=True, n_shared_experts=0, norm_topk_prob=False),
        "Qwen2MoeForCausalLM",
    ),
    "moe_top1": (
        dict(use_moe=True, n_shared_experts=1, num_experts_per_tok=1),
        "Qwen2MoeForCausalLM",
    ),
    "moe_qk_norm": (dict(use_moe=True, n_shared_experts=0, qk_norm=True), "Qwen3MoeForCausalLM"),
    "untied_wide_heads": (dict(tie_word_embeddings=False, head_dim=32), "LlamaForCausalLM"),
    "moe_untied_wide_heads": (
        dict(use_moe=True, tie_word_embeddings=False, head_dim=32),
        "Qwen2MoeForCausalLM",
    ),
    "dense_yarn": (YARN, "LlamaForCausalLM"),
    "moe_shared_yarn": (dict(use_moe=True, **YARN), "Qwen2MoeForCausalLM"),
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("convert"))


def make(case: str, seed: int = 0) -> MiniMindForCausalLM:
    """The case's tiny model with O(1) activations: matrices ~ N(0, 1/fan_in), embeddings
    N(0, 1), norm gains U(0.5, 1.5) (not all ones, so a dropped or misplaced norm shows)."""
    model = MiniMindForCausalLM(preset("tiny", **CASES[case][0]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return model.eval()


def unknowable(case: str) -> dict:
    """What a .pth of the case's model cannot tell: load_minimind2_pth's extra arguments."""
    cfg = preset("tiny", **CASES[case][0])
    heads = {} if cfg.qk_norm else dict(num_attention_heads=4)  # q_norm gives head_dim
    fields = ("rope_theta", "rope_scaling", "max_position_embeddings", "norm_topk_prob")
    return {
        **heads,
        "num_experts_per_tok": cfg.num_experts_per_tok,
        **{k: getattr(cfg, k) for k in fields},
    }


def tokens(seed: int, batch: int, length: int, vocab: int = 512) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def assert_same_weights(a: MiniMindForCausalLM, b: MiniMindForCausalLM) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


# --- MiniMind2 .pth ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["minimind2-small", "minimind2", "minimind2-moe"])
def test_public_minimind2_shapes_infer_their_preset(name):
    with torch.device("meta"):  # shapes only: no memory, no init cost
        sd = MiniMindForCausalLM(preset(name)).state_dict()
    del sd["lm_head.weight"]  # tied: a folder may hold only the embedding
    assert infer_config_from_state_dict(sd) == preset(name)


@pytest.mark.parametrize("case", ["dense", "qk_norm", "moe_shared"])
def test_pth_is_minimind2_format_and_loads_back(case, tmp_path):
    model = make(case)
    path = tmp_path / "full_sft_64.pth"
    save_minimind2_pth(model, path)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    assert list(sd) == list(model.state_dict())  # MiniMind2 names, both tied keys
    assert all(v.dtype == torch.float16 for v in sd.values())
    assert torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"])
    back = load_minimind2_pth(path, **unknowable(case))
    assert back.config == model.config
    for k, v in back.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, sd[k].float()), k
    assert back.lm_head.weight is back.model.embed_tokens.weight


def test_pth_heads_default_to_minimind2_and_kv_heads_follow():
    with torch.device("meta"):
        sd = MiniMindForCausalLM(
            preset("tiny", num_attention_heads=8, num_key_value_heads=4)
        ).state_dict()
    del sd["lm_head.weight"]
    cfg = infer_config_from_state_dict(sd)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (8, 4, 8)


def test_pth_mismatches_name_key_expected_and_found(tmp_path):
    sd = {k: v.half() for k, v in make("dense").state_dict().items()}
    sd["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(16, 64, dtype=torch.float16)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as e:
        load_minimind2_pth(tmp_path / "bad.pth", num_attention_heads=4)
    assert "model.layers.1.self_attn.k_proj.weight: expected (32, 64), found (16, 64)" in str(
        e.value
    )
    with pytest.raises(CheckpointError, match=r"--num_key_value_heads 1 does not fit: .*k_proj"):
        infer_config_from_state_dict(sd, num_attention_heads=4, num_key_value_heads=1)
    q = make("qk_norm").state_dict()
    with pytest.raises(CheckpointError, match=r"contradicts model\.layers\.0\.self_attn\.q_norm"):
        infer_config_from_state_dict(q, num_attention_heads=2)
    del sd["model.norm.weight"]
    with pytest.raises(CheckpointError, match=r"missing keys: model\.norm\.weight"):
        load_minimind2_pth_from(sd, tmp_path)
    with pytest.raises(ValueError, match="read from the weights' shapes"):
        infer_config_from_state_dict(sd, hidden_size=32)


def load_minimind2_pth_from(sd, tmp_path):
    torch.save(sd, tmp_path / "x.pth")
    return load_minimind2_pth(tmp_path / "x.pth", num_attention_heads=4)


def test_resume_checkpoint_holds_the_state_dict_under_model(tmp_path):
    model = make("dense")
    torch.save({"model": model.state_dict(), "epoch": 1, "step": 7}, tmp_path / "r.pth")
    assert_same_weights(load_minimind2_pth(tmp_path / "r.pth", num_attention_heads=4), model)


# --- MiniMind2 transformers folders (model_type "minimind") --------------------------------------


def write_minimind2_folder(model: MiniMindForCausalLM, folder: Path, safetensors: bool) -> None:
    """What MiniMind's convert_torch2transformers_minimind writes: its config fields, its keys."""
    c = model.config
    folder.mkdir(parents=True)
    config = dict(
        architectures=["MiniMindForCausalLM"],
        auto_map={
            "AutoConfig": "model_minimind.MiniMindConfig",
            "AutoModelForCausalLM": "model_minimind.MiniMindForCausalLM",
        },
        model_type="minimind",
        hidden_size=c.hidden_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        vocab_size=c.vocab_size,
        rms_norm_eps=c.rms_norm_eps,
        rope_theta=c.rope_theta,
        max_position_embeddings=c.max_position_embeddings,
        use_moe=c.use_moe,
        n_routed_experts=c.n_routed_experts,
        n_shared_experts=c.n_shared_experts,
        num_experts_per_tok=c.num_experts_per_tok,
        norm_topk_prob=c.norm_topk_prob,
        aux_loss_alpha=c.aux_loss_alpha,
        seq_aux=c.seq_aux,
        scoring_func="softmax",
        flash_attn=True,
        dropout=0.0,
        hidden_act="silu",
        intermediate_size=c.intermediate_size,
        bos_token_id=1,
        eos_token_id=2,
        inference_rope_scaling=c.rope_scaling is not None,
        rope_scaling=None
        if c.rope_scaling is None
        else {**c.rope_scaling, "attention_factor": 1.0},
        torch_dtype="float16",
        transformers_version="4.57.1",
    )
    (folder / "config.json").write_text(json.dumps(config))
    sd = {k: v.half() for k, v in model.state_dict().items()}
    if safetensors:
        del sd["lm_head.weight"]  # transformers drops the tied copy (safetensors forbids sharing)
        save_file(sd, folder / "model.safetensors")
    else:
        torch.save(sd, folder / "pytorch_model.bin")


@pytest.mark.parametrize("case, safetensors", [("dense", True), ("moe_shared_yarn", False)])
@torch.no_grad()
def test_minimind2_folder_loads_without_remote_code(case, safetensors, tmp_path):
    model = make(case)
    for p in model.parameters():  # the folder stores fp16 (parameters only: see the report on
        p.data = p.data.half().float()  # model.half() rounding the rotary buffers)
    write_minimind2_folder(model, tmp_path / "MiniMind2-Small", safetensors)
    back = load_hf_folder(tmp_path / "MiniMind2-Small")
    assert back.config == model.config
    assert_same_weights(back, model)
    ids = tokens(0, 2, 50)
    assert torch.equal(back(ids).logits, model(ids).logits)


def test_minimind2_folder_config_must_agree_with_weights(tmp_path):
    write_minimind2_folder(make("dense"), tmp_path / "m", safetensors=True)
    cfg = json.loads((tmp_path / "m/config.json").read_text())
    (tmp_path / "m/config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(CheckpointError, match="num_hidden_layers=3 but the weights have 2"):
        load_hf_folder(tmp_path / "m")
    yarn = {**MINIMIND2_YARN, "attention_factor": 0.8}
    cfg.update(inference_rope_scaling=True, rope_scaling=yarn)
    (tmp_path / "m/config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="attention scaling is not supported"):
        load_hf_folder(tmp_path / "m")


# --- transformers export: folder contents, round trips, refusals --------------------------------


def write_tokenizer(folder: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(["hello world, small models"] * 20, trainer)
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))
    config = dict(
        tokenizer_class="PreTrainedTokenizerFast",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_export_folder_contents(tmp_path):
    model = make("dense_yarn")
    arch = export_hf_folder(model, tmp_path / "hf", write_tokenizer(tmp_path / "tok"))
    assert arch == "LlamaForCausalLM"
    config = json.loads((tmp_path / "hf/config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "auto_map" not in config
    assert config["tie_word_embeddings"] is True
    assert config["rope_parameters"] == {
        "rope_type": "yarn",
        "rope_theta": 1e4,
        "factor": 4.0,
        "original_max_position_embeddings": 32,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "attention_factor": 1.0,
        "truncate": True,
    }
    gen = json.loads((tmp_path / "hf/generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (1, 2, 0)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert (
        tok.eos_token == "<|im_end|>" and tok.decode(tok("hello world").input_ids) == "hello world"
    )


def test_minimind2_yarn_constants_rotate_identically_in_transformers():
    # MiniMind2's own YaRN at its real head_dim (64) and theta: check_rotary inside refuses if
    # transformers' inverse frequencies differ from ours.
    cfg = dict(num_hidden_layers=1, vocab_size=64, rope_scaling=MINIMIND2_YARN)
    hf = to_hf_model(MiniMindForCausalLM(preset("minimind2-small", **cfg)))
    assert hf.config.rope_parameters["factor"] == 16.0


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_round_trip_pth_ours_hf_ours_is_bit_identical(case, dtype, tmp_path):
    save_minimind2_pth(make(case, seed=3), tmp_path / "w.pth")
    ours = load_minimind2_pth(tmp_path / "w.pth", **unknowable(case))
    export_hf_folder(ours, tmp_path / "hf", dtype=dtype)
    back = load_hf_folder(tmp_path / "hf")
    assert back.config == ours.config
    assert_same_weights(back, ours)
    save_minimind2_pth(back, tmp_path / "again.pth")
    a = torch.load(tmp_path / "w.pth", weights_only=True)
    b = torch.load(tmp_path / "again.pth", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_refusals_name_the_reason(tmp_path):
    with pytest.raises(ConversionError, match="q/k norm AND shared experts"):
        hf_architecture(preset("tiny", use_moe=True, qk_norm=True))
    # a learned shared-expert gate (a real Qwen1.5-MoE) cannot be expressed by MiniMind
    hf = to_hf_model(make("moe_shared"))
    with torch.no_grad():
        hf.model.layers[1].mlp.shared_expert_gate.weight.fill_(0.1)
    hf.save_pretrained(tmp_path / "gated")
    with pytest.raises(
        ConversionError, match=r"layers\.1\.mlp\.shared_expert_gate.weight is not zero"
    ):
        load_hf_folder(tmp_path / "gated")
    # YaRN with its default attention temperature (0.1 ln(s) + 1)
    hf = to_hf_model(make("dense_yarn"))
    del hf.config.rope_parameters["attention_factor"]
    hf.save_pretrained(tmp_path / "mscale")
    with pytest.raises(ConversionError, match=r"attention_factor must be 1\.0"):
        load_hf_folder(tmp_path / "mscale")
    # non-zero attention biases
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, attention_bias=True,
    )  # fmt: skip
    hf = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        hf.model.layers[0].self_attn.q_proj.bias.fill_(0.1)
    hf.save_pretrained(tmp_path / "bias")
    with pytest.raises(ConversionError, match=r"q_proj\.bias is not zero"):
        load_hf_folder(tmp_path / "bias")


# --- numerical parity with transformers ---------------------------------------------------------


@functools.cache
def pair(case: str, seed: int, tmp_root: str):
    """(ours, transformers' model loaded from the folder we exported)."""
    ours = make(case, seed)
    folder = f"{tmp_root}/{case}-{seed}"
    export_hf_folder(ours, folder)
    return ours, transformers.AutoModelForCausalLM.from_pretrained(folder).eval()


def greedy(model: MiniMindForCausalLM, ids, n: int, mask=None) -> torch.Tensor:
    """Greedy decoding over our model with our preallocated KV cache."""
    cache = model.new_cache(ids.shape[0], ids.shape[1] + n)
    logits = model(ids, attention_mask=mask, cache=cache).logits[:, -1]
    out = []
    for _ in range(n):
        nxt = logits.argmax(-1, keepdim=True)
        out.append(nxt)
        logits = model(nxt, cache=cache).logits[:, -1]
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_parity_full_sequence(case, seed, tmp_root):
    ours, hf = pair(case, seed, tmp_root)
    assert type(hf).__name__ == CASES[case][1]
    ids = tokens(seed, 2, 100 if "yarn" in case else 40)
    assert max_diff(ours(ids).logits, hf(ids).logits) <= TOL


@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_parity_left_padded_batch(case, tmp_root):
    ours, hf = pair(case, 0, tmp_root)
    length = 70 if "yarn" in case else 24
    ids = tokens(1, 3, length)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    mask[2, : length // 2] = 0
    ids[mask == 0] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # what transformers' generate derives
    a = ours(ids, attention_mask=mask).logits
    b = hf(ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    assert max_diff(a[real], b[real]) <= TOL


@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_parity_prefill_then_20_cached_decode_steps(case, tmp_root):
    ours, hf = pair(case, 1, tmp_root)
    ids = tokens(2, 2, 30 if "yarn" in case else 12)
    cache = ours.new_cache(2, ids.shape[1] + 20)
    out = hf(ids, use_cache=True)
    assert max_diff(ours(ids, cache=cache).logits, out.logits) <= TOL
    for step in range(20):
        nxt = tokens(100 + step, 2, 1)
        a = ours(nxt, cache=cache).logits
        out = hf(nxt, cache=out.cache, use_cache=True)
        assert max_diff(a, out.logits) <= TOL, f"decode step {step}"


@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_parity_greedy_generation_of_30_tokens(case, tmp_root):
    ours, hf = pair(case, 2, tmp_root)
    ids = tokens(3, 2, 8)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding: transformers derives positions from the mask itself
    ids[mask == 0] = 0
    expected = greedy(ours, ids, 30, mask)
    got = hf.generate(
        ids, attention_mask=mask, max_new_tokens=30, do_sample=False, eos_token_id=None
    )[:, ids.shape[1] :]
    assert torch.equal(expected, got)


# --- the command line ---------------------------------------------------------------------------


def test_cli_pth_to_hf_and_back(tmp_path, capsys):
    model = make("moe_shared")
    save_minimind2_pth(model, tmp_path / "out/full_sft_64_moe.pth")
    tok = write_tokenizer(tmp_path / "tok")
    argv = ["--weight", "full_sft", "--hidden_size", "64", "--use_moe", "1"]
    argv += ["--save_dir", str(tmp_path / "out"), "--transformers_path", str(tmp_path / "hf")]
    argv += ["--tokenizer", str(tok), "--num_attention_heads", "4", "--dtype", "float32"]
    assert convert_main(argv) == 0
    assert "Qwen2MoeForCausalLM" in capsys.readouterr().out
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert type(hf).__name__ == "Qwen2MoeForCausalLM"
    assert (tmp_path / "hf/tokenizer.json").is_file()
    assert convert_main(["--input", str(tmp_path / "hf"), "--output", str(tmp_path / "b.pth")]) == 0
    a = torch.load(tmp_path / "out/full_sft_64_moe.pth", weights_only=True)
    b = torch.load(tmp_path / "b.pth", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # through our own checkpoint format: the folder's tokenizer travels along by default
    ours = tmp_path / "ckpt"
    assert (
        convert_main(
            [
                "--input",
                str(tmp_path / "hf"),
                "--output",
                str(ours),
                "--to",
                "minimind",
                "--dtype",
                "float32",
            ]
        )
        == 0
    )
    assert (ours / "tokenizer.json").is_file()
    assert (
        convert_main(
            ["--input", str(ours), "--output", str(tmp_path / "hf2"), "--dtype", "float32"]
        )
        == 0
    )
    assert (
        convert_main(["--input", str(tmp_path / "hf2"), "--output", str(tmp_path / "c.pth")]) == 0
    )
    c = torch.load(tmp_path / "c.pth", weights_only=True)
    assert all(torch.equal(a[k], c[k]) for k in a)
    # an error is one line naming the problem, not a traceback
    argv = ["--input", str(tmp_path / "b.pth"), "--output", str(tmp_path / "x")]
    assert convert_main([*argv, "--num_attention_heads", "5"]) == 1
    assert "--num_attention_heads 5 does not fit" in capsys.readouterr().err


def test_script_is_a_thin_wrapper():
    out = subprocess.run(
        [sys.executable, str(REPO / "scripts/convert_model.py"), "--help"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert (
        "--transformers_path" in out.stdout and "--to {hf,pth,minimind,gguf,ollama}" in out.stdout
    )
