"""LoRA adapters on the tiny model: initial identity, frozen base, merge, adapter round trip,
target selection, config errors, dropout, torch.compile and DDP."""

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

from minimind.model import MiniMindForCausalLM, preset
from minimind.model.lora import (
    LoRAConfig,
    LoRALinear,
    apply_lora,
    load_lora_state_dict,
    lora_config_dict,
    lora_config_from_dict,
    lora_modules,
    lora_parameters,
    lora_state_dict,
    merge_lora,
)

IDS = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))


def make(seed=0, **kw):
    torch.manual_seed(seed)
    return MiniMindForCausalLM(preset("tiny", **kw)).eval()


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def train_steps(model, steps=3, lr=0.1):
    """A few SGD steps on the adapters, so lora_B is no longer zero."""
    opt = torch.optim.SGD(lora_parameters(model), lr=lr)
    model.train()
    for _ in range(steps):
        out = model(IDS[:, :-1])
        loss = nn.functional.cross_entropy(out.logits.flatten(0, 1), IDS[:, 1:].flatten())
        opt.zero_grad()
        (loss + out.aux_loss).backward()
        opt.step()
    return model.eval()


def test_fresh_adapter_equals_base_model():
    base = make()
    model = copy.deepcopy(base)
    names = apply_lora(model, LoRAConfig(r=4, alpha=8))
    assert len(names) == 2 * 7  # 2 layers x (4 attention + 3 MLP projections)
    assert all(isinstance(model.get_submodule(n), LoRALinear) for n in names)
    torch.testing.assert_close(logits(model), logits(base), rtol=0, atol=0)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_only_adapters_train_and_base_gets_no_gradient(checkpointing):
    model = make()
    apply_lora(model)
    model.set_activation_checkpointing(checkpointing)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_state_dict(model))
    assert {id(p) for p in lora_parameters(model)} == {
        id(p) for p in model.parameters() if p.requires_grad
    }
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied, frozen
    model.train()
    model(IDS).logits.float().pow(2).mean().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
        else:
            assert p.grad is None, name
    # B = 0 at init, so dL/dB = (dL/dy)^T (A x) != 0 while dL/dA = B^T ... = 0 (Hu et al. 4.1)
    assert all(m.lora_B.grad.abs().sum() > 0 for m in lora_modules(model).values())


@pytest.mark.parametrize("moe", [False, True])
def test_merge_equals_unmerged_and_restores_base_keys(moe):
    base = make(use_moe=moe)
    model = copy.deepcopy(base)
    apply_lora(model)
    train_steps(model)
    assert any(m.lora_B.abs().sum() > 0 for m in lora_modules(model).values())
    before = logits(model)
    assert not torch.allclose(before, logits(base), atol=1e-4)  # training did something
    merged_names = merge_lora(model)
    assert merged_names and not lora_modules(model)
    torch.testing.assert_close(logits(model), before, rtol=0, atol=1e-5)
    assert list(model.state_dict()) == list(base.state_dict())
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n in merged_names)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert merge_lora(model) == []  # nothing left to merge


def test_merge_of_one_layer_is_exact_and_keeps_bias_and_dtype():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(6, 5, bias=True).double(), r=2, alpha=3.0)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(4, 6, dtype=torch.double)
    merged = layer.merge()
    assert type(merged) is nn.Linear and merged.weight.dtype == torch.double
    assert merged.bias is layer.base.bias
    expected = layer.base(x) + x @ layer.lora_A.T @ layer.lora_B.T * 1.5
    torch.testing.assert_close(merged(x), expected.detach())
    torch.testing.assert_close(layer(x), expected)  # merge() left the adapter as it was


def test_adapter_follows_base_dtype():
    layer = LoRALinear(nn.Linear(8, 4, bias=False).to(torch.bfloat16), r=2, alpha=2.0)
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.bfloat16
    assert layer(torch.randn(3, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16
    assert layer.merge().weight.dtype == torch.bfloat16


def test_adapter_state_dict_round_trip_into_fresh_model():
    config = LoRAConfig(r=4, alpha=4)
    trained = make()
    apply_lora(trained, config)
    train_steps(trained)
    sd = {k: v.clone() for k, v in lora_state_dict(trained).items()}
    parts = [f"self_attn.{p}_proj" for p in "qkvo"] + [
        f"mlp.{p}_proj" for p in ("gate", "up", "down")
    ]
    assert set(sd) == {
        f"model.layers.{i}.{part}.lora_{ab}" for i in range(2) for part in parts for ab in "AB"
    }
    assert sd["model.layers.0.self_attn.k_proj.lora_A"].shape == (4, 64)  # (r, in)
    assert sd["model.layers.0.self_attn.k_proj.lora_B"].shape == (32, 4)  # (out, r): 2 kv heads

    fresh = make()  # same base seed, new adapters
    apply_lora(fresh, lora_config_from_dict(lora_config_dict(config)))
    assert not torch.equal(logits(fresh), logits(trained))
    load_lora_state_dict(fresh, sd)
    torch.testing.assert_close(logits(fresh), logits(trained), rtol=0, atol=0)


def test_strict_adapter_load_names_every_problem():
    model = make()
    apply_lora(model, LoRAConfig(r=4))
    sd = {k: v.clone() for k, v in lora_state_dict(model).items()}
    del sd["model.layers.1.mlp.up_proj.lora_B"]
    sd["model.layers.0.mlp.up_proj.lora_A"] = torch.zeros(8, 64)
    sd["model.layers.9.self_attn.q_proj.lora_A"] = torch.zeros(4, 64)
    before = lora_state_dict(model)["model.layers.0.self_attn.q_proj.lora_A"].clone()
    sd["model.layers.0.self_attn.q_proj.lora_A"] = torch.ones(4, 64)
    with pytest.raises(ValueError) as err:
        load_lora_state_dict(model, sd)
    message = str(err.value)
    assert "missing: model.layers.1.mlp.up_proj.lora_B" in message
    assert "unexpected: model.layers.9.self_attn.q_proj.lora_A" in message
    assert "model.layers.0.mlp.up_proj.lora_A: adapter (8, 64) vs model (4, 64)" in message
    # Nothing was copied: the load is all or nothing.
    assert torch.equal(lora_state_dict(model)["model.layers.0.self_attn.q_proj.lora_A"], before)
    with pytest.raises(ValueError, match="no LoRA adapters: apply_lora"):
        load_lora_state_dict(make(), sd)


def test_attention_only_targets():
    model = make()
    names = apply_lora(model, LoRAConfig(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    assert names == [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkvo"]
    assert type(model.model.layers[0].mlp.up_proj) is nn.Linear


def test_dotted_suffix_targets():
    model = make()
    names = apply_lora(model, LoRAConfig(target_modules=("layers.1.self_attn.v_proj", "down_proj")))
    assert names == [
        "model.layers.0.mlp.down_proj",
        "model.layers.1.self_attn.v_proj",
        "model.layers.1.mlp.down_proj",
    ]


def test_moe_experts_adapted_router_never():
    model = make(use_moe=True)
    names = apply_lora(model)
    mlp = model.model.layers[0].mlp
    assert "model.layers.0.mlp.experts.3.down_proj" in names
    assert "model.layers.0.mlp.shared_experts.0.gate_proj" in names
    assert all(".mlp.gate." not in n + "." for n in names)
    assert type(mlp.gate).__name__ == "MoEGate" and not mlp.gate.weight.requires_grad
    assert isinstance(mlp.experts[0].gate_proj, LoRALinear)
    # A router is no Linear: naming it is an error, not a silent wrap.
    with pytest.raises(ValueError, match=r"\['gate'\] match no nn.Linear"):
        apply_lora(make(use_moe=True), LoRAConfig(target_modules=["gate"]))


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(r=0), "r must be an integer >= 1"),
        (dict(r=2.5), "r must be an integer >= 1"),
        (dict(alpha=0), "alpha must be > 0"),
        (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
        (dict(dropout=-0.1), r"dropout must be in \[0, 1\)"),
        (dict(target_modules=()), "target_modules is empty"),
        (dict(target_modules="q_proj"), "must be a list of names"),
        (dict(target_modules=["q_proj", ".v_proj"]), "must be module names"),
    ],
)
def test_invalid_configs_fail_at_construction(kw, message):
    with pytest.raises(ValueError, match=message):
        LoRAConfig(**kw)


def test_bad_targets_list_the_available_names():
    with pytest.raises(ValueError) as err:
        apply_lora(make(), LoRAConfig(target_modules=["q_proj", "qproj"]))
    message = str(err.value)
    assert "['qproj'] match no nn.Linear" in message
    assert (
        "available: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"
        in message
    )
    assert "'model.layers.0.self_attn.q_proj'" in message  # the dotted-suffix example


def test_tied_head_is_refused_untied_head_allowed():
    with pytest.raises(ValueError, match="tied embeddings"):
        apply_lora(make(), LoRAConfig(target_modules=["lm_head"]))
    untied = make(tie_word_embeddings=False)
    assert apply_lora(untied, LoRAConfig(target_modules=["lm_head"])) == ["lm_head"]


def test_applying_twice_is_an_error():
    model = make()
    apply_lora(model)
    with pytest.raises(ValueError, match="already has 14 LoRA adapters"):
        apply_lora(model)
    merge_lora(model)
    apply_lora(model)  # a merged model is plain again and takes a new adapter


def test_config_json_form_is_strict():
    data = lora_config_dict(LoRAConfig(r=2, dropout=0.1))
    assert lora_config_from_dict(data) == LoRAConfig(r=2, dropout=0.1)
    with pytest.raises(ValueError, match="not a LoRA adapter config"):
        lora_config_from_dict({**data, "format": "minimind"})
    with pytest.raises(ValueError, match="unknown LoRAConfig fields: rank"):
        lora_config_from_dict({**data, "rank": 4})


def test_dropout_only_in_train_mode():
    model = make()
    apply_lora(model, LoRAConfig(dropout=0.5))
    for m in lora_modules(model).values():
        nn.init.normal_(m.lora_B, std=0.5)
    model.train()
    assert not torch.equal(logits(model), logits(model))
    model.eval()
    torch.testing.assert_close(logits(model), logits(model), rtol=0, atol=0)
    # The base path is never dropped: with B = 0 the train-mode output is the base's.
    base = make()
    fresh = copy.deepcopy(base)
    apply_lora(fresh, LoRAConfig(dropout=0.5))
    torch.testing.assert_close(logits(fresh.train()), logits(base), rtol=0, atol=0)


def test_compile_full_graph_forward_and_backward():
    """fullgraph=True fails on any graph break, so LoRALinear adds none; grads match eager.

    aot_eager runs Dynamo and AOTAutograd (where breaks and tracing errors arise) in seconds;
    inductor's code generation adds nothing LoRA-specific and takes minutes on a cold CPU cache.
    """
    torch._dynamo.reset()
    model = make()
    apply_lora(model, LoRAConfig(dropout=0.0))
    for m in lora_modules(model).values():
        nn.init.normal_(m.lora_B, std=0.1)
    twin = copy.deepcopy(model)
    compiled = torch.compile(twin, backend="aot_eager", fullgraph=True)
    for net in (model, compiled):
        net.train()
        net(IDS).logits.float().pow(2).mean().backward()
    for a, b in zip(lora_parameters(model), lora_parameters(twin), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6)
    torch._dynamo.reset()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_ddp_without_find_unused_parameters(tmp_path):
    """DDP raises on the second step if any trainable parameter got no gradient. A one-token
    batch leaves two of the four routed experts without tokens: they must still join."""
    model = make(use_moe=True)
    apply_lora(model)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        for step in range(3):
            out = ddp(IDS[:1, step : step + 1])
            (out.logits.float().mean() + out.aux_loss).backward()
        # Free DDP (its Reducer holds the process group) while the group is still up: freed
        # after destroy_process_group, the Reducer drops the group's last reference and gloo's
        # destructor joined its threads forever once in CI (a hang no timeout can interrupt).
        del ddp, out
    finally:
        dist.destroy_process_group()
    assert all(p.grad is not None for p in lora_parameters(model))
