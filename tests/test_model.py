"""The model package on its own: presets, validation, cache/padding equivalences, MoE, YaRN."""

import subprocess
import sys

import pytest
import torch

from minimind.model import MINIMIND2_YARN, MiniMindForCausalLM, ModelConfig, preset
from minimind.model.layers import InputGroup, apply_rotary, rope_inv_freq
from minimind.model.moe import MoEFeedForward


def make(name="tiny", seed=0, **kw):
    torch.manual_seed(seed)
    return MiniMindForCausalLM(preset(name, **kw)).eval()


@pytest.mark.parametrize(
    "name, count",
    [("minimind2-small", 25_829_888), ("minimind2", 104_030_976), ("minimind2-moe", 145_029_760)],
)
def test_preset_parameter_counts_match_formats(name, count):
    cfg = preset(name)
    assert cfg.num_parameters() == count
    assert round(count / 1e6, 2) == {"minimind2-small": 25.83, "minimind2": 104.03}.get(
        name, 145.03
    )


def test_instantiated_counts_equal_arithmetic():
    for name, kw in [("minimind2-small", {}), ("demo", {}), ("tiny", dict(use_moe=True))]:
        cfg = preset(name, **kw)
        assert MiniMindForCausalLM(cfg).num_parameters() == cfg.num_parameters()
    assert 1e6 <= preset("demo").num_parameters() <= 3e6


def test_moe_active_parameters():
    active = preset("minimind2-moe").num_parameters(active=True)
    assert 85e6 < active < 100e6  # "about 92M active" in FORMATS.md counts the head twice


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(hidden_size=100, num_attention_heads=8), "does not divide hidden_size"),
        (dict(num_attention_heads=8, num_key_value_heads=3), "must divide"),
        (dict(use_moe=True, n_routed_experts=2, num_experts_per_tok=3), "num_experts_per_tok"),
        (dict(hidden_act="gelu"), "silu"),
        (dict(rope_scaling={"type": "linear"}), "yarn"),
        (dict(dropout=1.5), "dropout"),
    ],
)
def test_invalid_configs_fail_at_construction(kw, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kw)


def test_config_round_trip_and_unknown_fields():
    cfg = preset("tiny", qk_norm=True, use_moe=True, rope_scaling=MINIMIND2_YARN)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="bogus"):
        ModelConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_unknown_preset_names_choices():
    with pytest.raises(ValueError, match="minimind2-small"):
        preset("nope")


@pytest.mark.parametrize("kw", [{}, dict(qk_norm=True), dict(use_moe=True)])
def test_cached_decode_equals_full_forward(kw):
    model = make(**kw)
    ids = torch.randint(0, 512, (3, 16))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(3, 32)
        parts = [model(ids[:, :5], cache=cache).logits]
        parts.append(model(ids[:, 5:9], cache=cache).logits)  # chunked prefill at offset 5
        parts += [model(ids[:, i : i + 1], cache=cache).logits for i in range(9, 16)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 16


def test_left_padding_equals_unpadded_rows_with_and_without_cache():
    model = make()
    rows = [torch.randint(3, 512, (n,)) for n in (9, 5, 7)]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :], mask[i, width - len(r) :] = r, 1
    with torch.no_grad():
        padded = model(ids, attention_mask=mask).logits
        cache = model.new_cache(len(rows), width + 4)
        prefill = model(ids, attention_mask=mask, cache=cache).logits
        nxt = torch.randint(3, 512, (len(rows), 1))
        step = model(nxt, cache=cache).logits
        for i, r in enumerate(rows):
            alone = model(r[None]).logits[0]
            torch.testing.assert_close(padded[i, width - len(r) :], alone, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(prefill[i, width - len(r) :], alone, atol=1e-5, rtol=1e-5)
            cont = model(torch.cat([r, nxt[i]])[None]).logits[0, -1]
            torch.testing.assert_close(step[i, -1], cont, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(padded).all()


def test_cache_overflow_and_batch_mismatch_are_clear():
    model = make()
    cache = model.new_cache(1, 4)
    with pytest.raises(ValueError, match="overflow"):
        model(torch.ones(1, 5, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="rows"):
        model(torch.ones(2, 1, dtype=torch.long), cache=cache)


def test_logits_to_keep():
    model = make()
    ids = torch.randint(0, 512, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, logits_to_keep=1).logits, model(ids).logits[:, -1:])


def test_tied_head_shares_storage_and_gradients_flow():
    model = make().train()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(0, 512, (2, 8))
    model(ids).logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_yarn_matches_minimind2_formula_and_switches():
    d, theta = 64, 1e6
    plain = rope_inv_freq(d, theta, None)
    scaled = rope_inv_freq(d, theta, MINIMIND2_YARN)
    # High-frequency dims (the first ones) are kept, the slowest are divided by the factor.
    torch.testing.assert_close(scaled[:4], plain[:4])
    torch.testing.assert_close(scaled[-1], plain[-1] / 16)
    assert bool((scaled <= plain + 1e-12).all())
    model = make()
    ids = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        base = model(ids).logits
        model.set_rope_scaling(dict(MINIMIND2_YARN, original_max_position_embeddings=4))
        assert not torch.allclose(model(ids).logits, base)
        # Valid at any length, beyond max_position_embeddings too.
        long = torch.randint(0, 512, (1, model.config.max_position_embeddings + 8))
        assert torch.isfinite(model(long, logits_to_keep=1).logits).all()
        model.set_rope_scaling(None)
        torch.testing.assert_close(model(ids).logits, base)


def naive_moe(moe: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """Token-by-token reference for the grouped dispatch."""
    ids, weights, _ = moe.gate(x)
    flat = x.reshape(-1, x.shape[-1])
    out = torch.zeros_like(flat)
    for n in range(flat.shape[0]):
        for j in range(ids.shape[1]):
            out[n] += weights[n, j] * moe.experts[int(ids[n, j])](flat[n])
        for shared in moe.shared_experts:
            out[n] += shared(flat[n])
    return out.view_as(x)


@pytest.mark.parametrize("shared, norm", [(1, True), (0, True), (2, False)])
def test_grouped_moe_dispatch_equals_naive(shared, norm):
    torch.manual_seed(1)
    cfg = preset("tiny", use_moe=True, n_shared_experts=shared, norm_topk_prob=norm)
    moe = MoEFeedForward(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 7, cfg.hidden_size)
    y, _ = moe(x)
    torch.testing.assert_close(y, naive_moe(moe, x), atol=1e-5, rtol=1e-5)


def test_moe_aux_loss_levels_and_uniform_value():
    cfg = preset("tiny", use_moe=True)
    moe = MoEFeedForward(cfg).train()
    torch.nn.init.zeros_(moe.gate.weight)  # uniform router: f_i = 1, P_i = 1/E -> aux = alpha
    for p in moe.experts.parameters():
        torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(2, 6, cfg.hidden_size)
    _, aux = moe(x)
    torch.testing.assert_close(aux, torch.tensor(cfg.aux_loss_alpha))
    moe.gate.seq_aux = False
    _, aux_batch = moe(x)
    torch.testing.assert_close(aux_batch, torch.tensor(cfg.aux_loss_alpha))
    moe.eval()
    assert float(moe(x)[1]) == 0.0


def test_moe_every_expert_gets_a_gradient():
    model = make(use_moe=True, n_routed_experts=8, num_experts_per_tok=1).train()
    out = model(torch.randint(0, 512, (1, 2)))
    (out.logits.sum() + out.aux_loss).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_activation_checkpointing_gives_same_gradients():
    ids = torch.randint(0, 512, (2, 10))
    grads = []
    for ckpt in (False, True):
        model = make(seed=3, use_moe=True).train()
        model.set_activation_checkpointing(ckpt)
        out = model(ids)
        (out.logits.float().pow(2).mean() + out.aux_loss).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_bf16_forward_runs():
    model = make().to(torch.bfloat16)
    cache = model.new_cache(1, 8)
    out = model(torch.randint(0, 512, (1, 4)), cache=cache)
    assert out.logits.dtype == torch.bfloat16 and cache.layers[0].k.dtype == torch.bfloat16


def test_rotary_tables_stay_float32_when_the_model_is_cast():
    model = make("minimind2-small", num_hidden_layers=1).to(torch.bfloat16)
    cos, _ = model.model.rotary(torch.tensor([[4000]]))
    assert cos.dtype == torch.float32
    exact = (4000 * rope_inv_freq(64, 1e6, None).double()).cos()
    assert float((cos[0, 0, :32].double() - exact).abs().max()) < 1e-3


def test_model_package_imports_only_torch():
    code = (
        "import sys, minimind.model; "
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('transformers', 'tokenizers', 'safetensors') or m.startswith(('minimind.train', "
        "'minimind.data', 'minimind.tokenizer', 'minimind.infer', 'minimind.convert'))]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def groups(model):
    return [m for m in model.modules() if isinstance(m, InputGroup)]


def unfused_logits(model, ids):
    """Logits with every group run as separate Linears (the reference for the fused paths)."""
    saved = [g._fused_weight for g in groups(model)]
    for g in groups(model):
        g._fused_weight = None
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        for g, w in zip(groups(model), saved, strict=True):
            g._fused_weight = w


@pytest.mark.parametrize("kw", [{}, dict(use_moe=True, n_shared_experts=1)])
def test_fused_projections_are_views_and_keep_names_and_results(kw, tmp_path):
    from minimind.checkpoint import load_checkpoint, save_checkpoint

    model = make(**kw)
    ids = torch.randint(0, 512, (2, 9))
    with torch.no_grad():
        before = model(ids).logits  # never fused: separate Linears
    assert not any(g.fused_intact() for g in groups(model))
    names = list(model.state_dict())
    model.new_cache(2, 16)  # decoding starts: fused
    assert all(g.fused_intact() for g in groups(model))
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.untyped_storage().data_ptr() == (
        attn.v_proj.weight.untyped_storage().data_ptr()
    )
    assert list(model.state_dict()) == names
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, atol=1e-5, rtol=1e-5)
    save_checkpoint(tmp_path / "ck", model)  # safetensors refuses shared storage unless copied
    loaded, _ = load_checkpoint(tmp_path / "ck")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, before, atol=1e-5, rtol=1e-5)


def test_fused_projections_follow_fused_adamw_and_survive_to():
    model = make().train()
    model.fuse_projections()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    ids = torch.randint(0, 512, (2, 9))
    model(ids).logits.pow(2).mean().backward()  # autograd on: concatenated weights
    opt.step()  # in place through the views, without bumping version counters
    model.eval()
    assert all(g.fused_intact() for g in groups(model))
    with torch.no_grad():
        torch.testing.assert_close(
            model(ids).logits, unfused_logits(model, ids), atol=1e-5, rtol=1e-5
        )
    model.to(torch.float64)  # new storage: fused again, in the new dtype
    assert all(g.fused_intact() and g._fused_weight.dtype == torch.float64 for g in groups(model))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, unfused_logits(model, ids))


def test_broken_views_fall_back_to_separate_projections():
    model, other = make(seed=0), make(seed=1)
    model.fuse_projections()
    ids = torch.randint(0, 512, (2, 9))
    model.load_state_dict(other.state_dict(), assign=True)  # replaces the parameters
    assert not any(g.fused_intact() for g in groups(model))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, other(ids).logits)


def test_fused_qkv_training_path_equals_separate_projections_after_fused_adamw():
    model = make().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    ids = torch.randint(0, 512, (2, 9))
    model(ids).logits.pow(2).mean().backward()  # autograd on: the fused q/k/v matmul
    opt.step()  # fused AdamW updates in place without bumping version counters
    model.eval()
    with_grad = model(ids).logits.detach()
    with torch.no_grad():  # separate projections
        torch.testing.assert_close(model(ids).logits, with_grad, atol=1e-5, rtol=1e-5)


def test_rotary_tables_grown_inside_generate_can_train():
    # On a GPU the tables are first built for the device inside `generate` (inference mode);
    # training after a rollout then failed: "Inference tensors cannot be saved for backward".
    from minimind.model.layers import RotaryEmbedding

    rotary = RotaryEmbedding(preset("tiny", max_position_embeddings=16))
    with torch.inference_mode():
        rotary.ensure(64, torch.device("cpu"))  # grown here, as a new device would be
    assert rotary.cos.shape[0] >= 64 and not rotary.cos.is_inference()
    x = torch.randn(1, 40, 2, rotary.head_dim, requires_grad=True)
    cos, sin = rotary(torch.arange(40)[None])
    apply_rotary(x, cos, sin).sum().backward()  # saves cos/sin for backward
    assert x.grad is not None
