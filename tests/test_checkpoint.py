"""Checkpoint folders: round trips, dtypes, tied heads, strict errors, and atomicity under
real SIGKILLs and under a crash injected before every rename/fsync/delete of a save."""

import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import minimind
from minimind.checkpoint import (
    CheckpointError,
    CheckpointWriter,
    load_checkpoint,
    load_config,
    load_trainer_state,
    read_meta,
    resolve_checkpoint,
    save_checkpoint,
)
from minimind.fsutil import AtomicFolder
from minimind.model import MINIMIND2_YARN, MiniMindForCausalLM, preset

pytestmark = pytest.mark.usefixtures("one_thread")


def make(seed=0, **kw):
    torch.manual_seed(seed)
    return MiniMindForCausalLM(preset("tiny", **kw)).eval()


def logits(model, seed=1):
    ids = torch.randint(
        0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(seed)
    )
    with torch.no_grad():
        return model(ids).logits.float()


def stored(folder):
    with safe_open(str(Path(folder) / "model.safetensors"), framework="pt") as f:
        return {k: f.get_slice(k).get_dtype() for k in f.keys()}, f.metadata()  # noqa: SIM118


def siblings(path):
    return sorted(p.name for p in Path(path).parent.iterdir())


# --- round trips -------------------------------------------------------------------------


def test_fp32_round_trip_is_exact(tmp_path):
    model = make(extra={"note": "hi"})
    out = save_checkpoint(tmp_path / "ck", model, extra={"step": 7, "loss": 1.5})
    assert out == (tmp_path / "ck").absolute()
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "meta.json",
        "model.safetensors",
    ]
    loaded, config = load_checkpoint(out)
    assert config == model.config == load_config(out)
    assert not loaded.training and loaded.lm_head.weight.dtype == torch.float32
    assert torch.equal(logits(loaded), logits(model))
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    assert read_meta(out) == {"step": 7, "loss": 1.5}
    header = json.loads((out / "config.json").read_text())
    assert header["model_type"] == "minimind" and header["format_version"] == 1


def test_no_meta_reads_as_empty(tmp_path):
    save_checkpoint(tmp_path / "ck", make())
    assert read_meta(tmp_path / "ck") == {}


@pytest.mark.parametrize("name, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_half_precision_save(tmp_path, name, dtype):
    model = make()
    save_checkpoint(tmp_path / "ck", model, dtype=name)
    dtypes, metadata = stored(tmp_path / "ck")
    short = {"bf16": "BF16", "fp16": "F16"}[name]
    assert set(dtypes.values()) == {short} and metadata["dtype"] == name
    assert next(model.parameters()).dtype == torch.float32  # the model itself is not cast
    loaded, _ = load_checkpoint(tmp_path / "ck")  # dtype=None: as stored
    assert {p.dtype for p in loaded.parameters()} == {dtype}
    torch.testing.assert_close(logits(loaded), logits(model), atol=0.05, rtol=0.05)
    as_fp32, _ = load_checkpoint(tmp_path / "ck", dtype="fp32")
    assert {p.dtype for p in as_fp32.parameters()} == {torch.float32}
    torch.testing.assert_close(logits(as_fp32), logits(model), atol=0.05, rtol=0.05)


def test_torch_dtype_argument_and_bad_dtype(tmp_path):
    save_checkpoint(tmp_path / "ck", make(), dtype=torch.bfloat16)
    assert stored(tmp_path / "ck")[1]["dtype"] == "bf16"
    with pytest.raises(ValueError, match="int8"):
        save_checkpoint(tmp_path / "ck2", make(), dtype="int8")
    assert not (tmp_path / "ck2").exists() and ".ck2.tmp-" not in "".join(
        siblings(tmp_path / "ck2")
    )


def test_tied_head_stored_once_and_tied_after_load(tmp_path):
    model = make()
    save_checkpoint(tmp_path / "ck", model, dtype="bf16")
    names, metadata = stored(tmp_path / "ck")
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    assert json.loads(metadata["tied"]) == {"lm_head.weight": "model.embed_tokens.weight"}
    loaded, _ = load_checkpoint(tmp_path / "ck")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_untied_head_stored_separately(tmp_path):
    model = make(tie_word_embeddings=False)
    save_checkpoint(tmp_path / "ck", model)
    names, metadata = stored(tmp_path / "ck")
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= set(names)
    assert json.loads(metadata["tied"]) == {}
    loaded, _ = load_checkpoint(tmp_path / "ck")
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight
    assert torch.equal(logits(loaded), logits(model))


@pytest.mark.parametrize(
    "kw",
    [
        dict(use_moe=True, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2),
        dict(qk_norm=True),
        dict(rope_scaling=MINIMIND2_YARN, rope_theta=10000.0, rms_norm_eps=1e-6),
    ],
    ids=["moe", "qk_norm", "yarn"],
)
def test_variants_round_trip(tmp_path, kw):
    model = make(**kw)
    save_checkpoint(tmp_path / "ck", model)
    loaded, config = load_checkpoint(tmp_path / "ck")
    assert config == model.config
    assert torch.equal(logits(loaded), logits(model))


def test_wrapped_models_are_unwrapped(tmp_path):
    model = make()
    compiled_like = nn.Module()
    compiled_like._orig_mod = model  # what torch.compile's wrapper looks like
    save_checkpoint(tmp_path / "ck", compiled_like)
    assert "model.norm.weight" in stored(tmp_path / "ck")[0]


def test_tokenizer_files_copied(tmp_path):
    tok = tmp_path / "tok"
    tok.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (tok / name).write_text(name)
    (tok / "model.safetensors").write_text("not a tokenizer file")
    (tok / "weights.bin").write_text("not a tokenizer file")
    (tok / "sub").mkdir()
    save_checkpoint(tmp_path / "a", make(), tokenizer_dir=tok)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == [
        "chat_template.jinja",
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert (tmp_path / "a" / "tokenizer.json").read_text() == "tokenizer.json"
    # A checkpoint serves as the tokenizer source of the next one (its weights are not copied).
    save_checkpoint(tmp_path / "b", make(seed=3), tokenizer_dir=tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == files
    # Re-saving a checkpoint with its own tokenizer keeps the tokenizer.
    save_checkpoint(tmp_path / "b", make(seed=4), tokenizer_dir=tmp_path / "b")
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == files
    with pytest.raises(CheckpointError, match=r"neither tokenizer\.json"):
        save_checkpoint(tmp_path / "c", make(), tokenizer_dir=tmp_path / "tok" / "sub")


def test_trainer_state_and_extra_files(tmp_path):
    state = {"step": 3, "rng": torch.get_rng_state(), "optimizer": {"m": torch.ones(4)}}
    out = save_checkpoint(
        tmp_path / "ck",
        make(),
        trainer_state=state,
        extra_files={
            "sampler.json": json.dumps({"epoch": 1, "offset": 42}),
            "raw.bin": b"\x00\x01",
            "optim/rank0.pt": lambda p: torch.save({"x": torch.zeros(2)}, p),
            "dcp": lambda p: (p.mkdir(), (p / "shard0").write_bytes(b"s")),
        },
    )
    back = load_trainer_state(out)
    assert back["step"] == 3 and torch.equal(back["rng"], state["rng"])
    assert torch.equal(back["optimizer"]["m"], torch.ones(4))
    assert json.loads((out / "sampler.json").read_text()) == {"epoch": 1, "offset": 42}
    assert (out / "raw.bin").read_bytes() == b"\x00\x01"
    assert torch.equal(torch.load(out / "optim" / "rank0.pt")["x"], torch.zeros(2))
    assert (out / "dcp" / "shard0").read_bytes() == b"s"
    for bad in ("../escape", "/abs", "config.json", "model.safetensors", ""):
        with pytest.raises(CheckpointError):
            save_checkpoint(tmp_path / "ck", make(seed=9), extra_files={bad: b"x"})
    assert torch.equal(load_checkpoint(out)[0].lm_head.weight, make().lm_head.weight)
    with pytest.raises(CheckpointError, match=r"trainer_state\.pt is missing"):
        load_trainer_state(save_checkpoint(tmp_path / "bare", make()))


def test_writer_api_and_its_failures(tmp_path):
    path = tmp_path / "ck"
    with CheckpointWriter(path) as w:
        w.write_model(make())
        w.write_meta({"step": 1})
        (w.staging / "notes.txt").write_text("anything written under staging is committed")
    assert (path / "notes.txt").exists() and read_meta(path) == {"step": 1}
    # A writer that never wrote the model does not commit and leaves nothing behind.
    with (
        pytest.raises(CheckpointError, match=r"nothing wrote config\.json"),
        CheckpointWriter(path) as w,
    ):
        w.write_meta({"step": 2})
    # An exception inside the block discards the staged folder; the old checkpoint stays.
    with pytest.raises(RuntimeError, match="boom"), CheckpointWriter(path) as w:
        w.write_model(make(seed=5))
        raise RuntimeError("boom")
    assert read_meta(path) == {"step": 1}
    assert siblings(path) == [".ck.lock", "ck"]
    with pytest.raises(CheckpointError, match="JSON-serialisable"):
        save_checkpoint(path, make(), extra={"bad": object()})
    with pytest.raises(CheckpointError, match="JSON-serialisable"):
        save_checkpoint(path, make(), extra={"nan": float("nan")})
    assert read_meta(path) == {"step": 1} and siblings(path) == [".ck.lock", "ck"]


def test_refuses_to_replace_what_is_not_a_checkpoint(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        save_checkpoint(tmp_path / "out", make())
    (tmp_path / "file").write_text("keep me")
    with pytest.raises(CheckpointError, match="not a folder"):
        save_checkpoint(tmp_path / "file", make())
    assert (tmp_path / "out" / "precious.txt").read_text() == "keep me"
    (tmp_path / "empty").mkdir()
    save_checkpoint(tmp_path / "empty", make())  # an empty folder may become a checkpoint
    assert (tmp_path / "empty" / "config.json").exists()


def test_stale_leftovers_are_cleaned_on_next_save(tmp_path):
    path = tmp_path / "ck"
    save_checkpoint(path, make())
    (tmp_path / ".ck.tmp-0123456789abcdef").mkdir()  # a writer killed while staging
    (tmp_path / ".ck.tmp-0123456789abcdef" / "model.safetensors").write_bytes(b"half")
    save_checkpoint(tmp_path / "ck.old", make())  # a writer killed before deleting P.old
    (tmp_path / ".other.tmp-0123456789abcdef").mkdir()  # another checkpoint's: not ours
    save_checkpoint(path, make(seed=2))
    assert siblings(path) == [".ck.lock", ".ck.old.lock", ".other.tmp-0123456789abcdef", "ck"]


# --- strict loading ----------------------------------------------------------------------


def rewrite_weights(folder, edit):
    file = Path(folder) / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file)


def test_missing_unexpected_and_misshaped_keys_are_named(tmp_path):
    folder = tmp_path / "ck"
    save_checkpoint(folder, make())

    def drop(t):
        del t["model.layers.1.mlp.up_proj.weight"]

    rewrite_weights(folder, drop)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(folder)
    assert "missing keys: model.layers.1.mlp.up_proj.weight" in str(e.value)
    assert str(folder) in str(e.value)

    save_checkpoint(folder, make())
    rewrite_weights(folder, lambda t: t.update({"model.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected keys: model\.extra\.weight") as e:
        load_checkpoint(folder)
    assert str(folder) in str(e.value)

    save_checkpoint(folder, make())
    rewrite_weights(folder, lambda t: t.update({"model.norm.weight": torch.ones(3)}))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(folder)
    assert "model.norm.weight: expected (64,), found (3,)" in str(e.value)
    assert str(folder) in str(e.value)


def test_config_that_disagrees_with_weights_is_named(tmp_path):
    folder = tmp_path / "ck"
    save_checkpoint(folder, make())
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"missing keys: model\.layers\.2\."):
        load_checkpoint(folder)


def test_unreadable_checkpoints_name_the_folder(tmp_path):
    folder = tmp_path / "ck"
    with pytest.raises(CheckpointError, match=f"no checkpoint folder at {folder}"):
        load_checkpoint(folder)

    def broken(edit):
        save_checkpoint(folder, make())
        edit()
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(folder)
        assert str(folder) in str(e.value)
        return str(e.value)

    assert "config.json is missing" in broken(lambda: (folder / "config.json").unlink())
    assert "model.safetensors is missing" in broken(lambda: (folder / "model.safetensors").unlink())
    assert "not valid JSON" in broken(lambda: (folder / "config.json").write_text("{oops"))
    assert "cannot read model.safetensors" in broken(
        lambda: (folder / "model.safetensors").write_bytes(b"\x00" * 5)
    )

    def add_field(**fields):
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **fields}))

    msg = broken(lambda: add_field(flash_attn=True, zzz=1))
    assert "unknown ModelConfig fields: flash_attn, zzz" in msg
    assert "newer" in broken(lambda: add_field(format_version=99))
    assert "minimind.convert" in broken(lambda: add_field(model_type="llama"))
    assert "num_key_value_heads" in broken(lambda: add_field(num_key_value_heads=3))
    save_checkpoint(folder, make())
    (folder / "meta.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"meta\.json is not a JSON object"):
        read_meta(folder)


def test_resolve_falls_back_to_old(tmp_path):
    path = tmp_path / "ck"
    save_checkpoint(path, make())
    path.rename(tmp_path / "ck.old")  # what a kill between the two renames leaves
    assert resolve_checkpoint(path) == tmp_path / "ck.old"
    assert load_config(path) == make().config
    save_checkpoint(path, make(seed=1))  # P missing, P.old present: P.old kept until P lands
    assert siblings(path) == [".ck.lock", "ck"]
    assert torch.equal(load_checkpoint(path)[0].lm_head.weight, make(seed=1).lm_head.weight)


# --- atomicity ---------------------------------------------------------------------------


def filled(model, version):
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(version)
    return model


def save_version(path, model, version):
    save_checkpoint(
        path,
        filled(model, version),
        extra={"version": version},
        trainer_state={"version": version, "moments": torch.full((256,), float(version))},
    )


def loaded_version(path, config):
    """The version of the complete checkpoint at `path`; fails on any mixture."""
    model, loaded_config = load_checkpoint(path)
    assert loaded_config == config
    values = torch.cat([p.detach().flatten() for p in model.parameters()])
    version = values[0].item()
    assert bool((values == version).all()), "weights from more than one save"
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert read_meta(path) == {"version": version}
    state = load_trainer_state(path)
    assert state["version"] == version and bool((state["moments"] == version).all())
    return int(version)


def test_readers_racing_a_writer_get_whole_checkpoints(tmp_path):
    path = tmp_path / "deep" / "er" / "ck"  # parents are created
    save_version(path, make(), 0)
    errors, done = [], threading.Event()

    def writer():
        try:
            model = make()
            for version in range(1, 25):
                save_version(path, model, version)
        except BaseException as e:
            errors.append(e)
        finally:
            done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    seen = []
    while not done.is_set():
        model, _ = load_checkpoint(path)
        values = torch.cat([p.detach().flatten() for p in model.parameters()])
        assert bool((values == values[0]).all()), "a load mixed two saves"
        seen.append(int(values[0]))
        assert read_meta(path)["version"] >= seen[-1]
    thread.join()
    assert not errors and seen == sorted(seen)  # whole checkpoints, never going back
    assert loaded_version(path, make().config) == 24


class Crash(BaseException):
    """Stands for a SIGKILL: nothing catches it, and the patched abort() cleans nothing."""


def test_crash_before_every_rename_fsync_and_delete(tmp_path, monkeypatch):
    path = tmp_path / "ck"
    model = make()
    steps, fallbacks = 0, 0
    while True:
        save_version(path, model, 1)
        steps += 1
        calls = 0

        def crash_at(fn, step=steps):
            def wrapped(*args, **kwargs):
                nonlocal calls
                calls += 1
                if calls == step:
                    raise Crash
                return fn(*args, **kwargs)

            return wrapped

        crashed = False
        with monkeypatch.context() as m:
            m.setattr(AtomicFolder, "abort", lambda self: self._unlock())
            for name in ("replace", "fsync"):
                m.setattr(os, name, crash_at(getattr(os, name)))
            m.setattr("shutil.rmtree", crash_at(shutil.rmtree))
            try:
                save_version(path, model, 2)
            except Crash:
                crashed = True
        version = loaded_version(path, model.config)
        assert version in (1, 2)
        if not path.exists():  # crashed between P -> P.old and staging -> P
            assert resolve_checkpoint(path) == tmp_path / "ck.old" and version == 1
            fallbacks += 1
        save_version(path, model, 3)  # the next save recovers and tidies up
        assert loaded_version(path, model.config) == 3
        assert siblings(path) == [".ck.lock", "ck"]
        if not crashed:
            assert version == 2
            break
    assert steps > 8 and fallbacks >= 1


CHILD = r"""
import json, os, sys
import torch
from minimind.checkpoint import save_checkpoint
from minimind.model import MiniMindForCausalLM, preset

path = sys.argv[1]
config = preset(**json.loads(sys.argv[2]))

def writer(version):
    torch.set_num_threads(1)  # no OpenMP pool inherited across fork
    model = MiniMindForCausalLM(config)
    while True:
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(version)
        print("saving", version, flush=True)
        save_checkpoint(
            path,
            model,
            extra={"version": version},
            trainer_state={"version": version, "moments": torch.full((256,), float(version))},
        )
        print("saved", version, flush=True)
        version += 1

# A fork server: torch is imported once (seconds), each writer is a forked process (ms).
print("ready", flush=True)
for line in sys.stdin:
    pid = os.fork()
    if pid == 0:
        try:
            writer(int(line))
        finally:
            os._exit(1)
    print("worker", pid, flush=True)
    os.waitpid(pid, 0)
    print("reaped", 0, flush=True)
"""
# About 1.6M parameters (6.5 MB in fp32): a save takes tens of milliseconds, long enough to be
# killed in any of its phases.
KILL_PRESET = dict(name="tiny", hidden_size=192, num_hidden_layers=3, vocab_size=2048)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork and SIGKILL")
@pytest.mark.timeout(120)
def test_sigkill_at_random_moments_leaves_a_complete_checkpoint(tmp_path):
    seed = int(os.environ.get("MINIMIND_KILL_SEED", random.randrange(2**32)))
    rng = random.Random(seed)
    config = preset(**KILL_PRESET)
    path = tmp_path / "ckpts" / "ck"
    package_root = str(Path(minimind.__file__).resolve().parent.parent)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")]),
    }
    stderr = open(tmp_path / "child.err", "w+")  # noqa: SIM115 (read back on failure)
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), json.dumps(KILL_PRESET)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        env=env,
    )
    save_version(path, MiniMindForCausalLM(config), 0)  # while the child imports torch

    def read():
        line = child.stdout.readline()
        if not line:
            stderr.seek(0)
            pytest.fail(f"writer process died (seed {seed}):\n{stderr.read()}")
        kind, value = line.split()
        return kind, int(value) if kind != "ready" else 0

    worker = None
    done, started, durations, phases = 0, 0, [], []
    try:
        child.stdout.readline()  # "ready"
        for _ in range(8):
            child.stdin.write(f"{started + 1}\n")
            child.stdin.flush()
            kind, worker = read()
            assert kind == "worker"
            let_finish = rng.randint(0, 2)  # complete saves before the one we kill in
            while True:
                kind, value = read()
                if kind == "saving":
                    started, t0 = value, time.perf_counter()
                    if let_finish == 0:
                        break
                else:
                    done, let_finish = value, let_finish - 1
                    durations.append(time.perf_counter() - t0)
            typical = statistics.median(durations) if durations else 0.05
            time.sleep(rng.uniform(0.0, 1.2 * typical))
            os.kill(worker, signal.SIGKILL)
            while (line := read())[0] != "reaped":  # the worker is dead once reaped
                if line[0] == "saved":
                    done = line[1]
                else:
                    started = line[1]
            worker = None
            left = set(siblings(path)) - {".ck.lock", "ck"}
            phases.append("/".join(sorted(left)) or "between saves")
            version = loaded_version(path, config)
            # Never a torn folder, never older than a save that reported completion.
            assert done <= version <= started, (seed, done, version, started, left)
    finally:
        if worker is not None:
            os.kill(worker, signal.SIGKILL)
        child.stdin.close()
        child.wait(timeout=30)
        stderr.close()
    print(f"seed {seed}: kills left {phases}")  # shown with -s
    # A staging folder or P.old left behind: the kill landed inside a save.
    assert any(p != "between saves" for p in phases), f"no kill inside a save (seed {seed})"
    save_version(path, MiniMindForCausalLM(config), started + 1)
    assert siblings(path) == [".ck.lock", "ck"]
    assert loaded_version(path, config) == started + 1


# --- the training engine resumes through this reader -------------------------------------


def test_engine_resume_reads_through_the_checkpoint_reader(tmp_path, capsys):
    """The engine's resume reads a step checkpoint with load_checkpoint_weights: a corrupt
    weights file is a CheckpointError naming the folder (not safetensors' bare error), and a
    save killed between its two renames (only step_N.old left) resumes from step_N.old."""
    from tests.train_fixtures import make_data, train

    data = make_data(tmp_path / "data")
    run = tmp_path / "run"
    train(run, data["pretrain"], 2, keep_last=1)
    step = run / "step_00000002"
    weights = (step / "model.safetensors").read_bytes()
    (step / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(CheckpointError, match=r"step_00000002: cannot read model\.safetensors"):
        train(run, data["pretrain"], 3)
    (step / "model.safetensors").write_bytes(weights)
    step.rename(run / "step_00000002.old")  # what a kill between the two renames leaves
    capsys.readouterr()
    train(run, data["pretrain"], 3, keep_last=1)
    assert "resumed from" in capsys.readouterr().out
    assert read_meta(run / "step_00000003")["step"] == 3
