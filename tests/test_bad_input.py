"""Bad input: one clear message naming the problem, a non-zero exit, nothing trained."""

import os

import pytest
import torch

from helpers import ROOT, cascade, h100_profile


def one_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("cascade: error:")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def test_unknown_key(tmp_path):
    one_error(cascade("train", "configs/base.yaml", "model.num_layrs=3",
                      f"run_dir={tmp_path}"), "model.num_layrs", "did you mean 'model.num_layers'")


def test_unknown_key_in_yaml(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("base: " + os.path.join(ROOT, "configs/base.yaml") +
                   "\ntrain:\n  stepz: 3\n")
    one_error(cascade("train", str(cfg)), "train.stepz", str(cfg))


@pytest.mark.parametrize("text,needle", [
    ("model:\n  num_layers: [1, 2\n", "line 3, column 1: not valid YAML"),
    ("model:\n  - 1\n  - 2\n", "'model' must be a mapping of its settings"),
    ("- model\n", "holds a list, not a mapping of sections"),
])
def test_unreadable_yaml(tmp_path, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    one_error(cascade("train", path, f"run_dir={tmp_path}/run"), needle, str(path))
    assert not (tmp_path / "run").exists()


def test_vocabulary_below_the_tokenizers(tmp_path):
    one_error(cascade("train", *TINY_RUN, "model.vocab_size=10", f"run_dir={tmp_path}/run"),
              "'model.vocab_size' = 10 is smaller than the tokenizer's")


def test_wrong_type(tmp_path):
    one_error(cascade("train", "configs/base.yaml", "train.steps=many",
                      f"run_dir={tmp_path}"), "train.steps")


@pytest.mark.parametrize("override,needle", [
    ("diffusion.block_size=7", "diffusion.block_size"),
    ("parallel.tensor=3", "parallel.tensor"),
    ("train.global_batch_size=12", "train.global_batch_size"),
    # experts (the layouts that need several processes: test_torchrun.py)
    ("model.moe.pattern=[1,0]", "'model.moe.pattern' has 2 entries"),
    ("model.moe.first_dense_layers=4", "leaves no layer with experts"),
    ("model.moe.expert_bias=true", "needs 'model.moe.score_function' = sigmoid"),
    ("model.moe.top_k=1", "'model.moe.norm_topk_prob' = false"),
    ("model.moe.score_functio=sigmoid", "did you mean 'model.moe.score_function'"),
    # values a run would take silently or fail on late
    ("optimizer.lr=-0.001", "'optimizer.lr' must be positive"),
    ("optimizer.beta2=1.5", "'optimizer.beta2' = 1.5"),
    ("model.num_query_groups=0", "'model.num_query_groups' must be positive"),
    ("checkpoint.keep_last=-1", "'checkpoint.keep_last' must be >= 1"),
])
def test_impossible_combination(tmp_path, override, needle):
    moe = ["model.moe.num_experts=4"] if override.startswith("model.moe") else []
    one_error(cascade("train", "configs/base.yaml", *moe, override, f"run_dir={tmp_path}"),
              needle)


def test_submit_without_sbatch_writes_nothing(tmp_path):
    profile = h100_profile(tmp_path)
    proc = cascade("submit", "configs/base.yaml", "--cluster", profile, f"run_dir={tmp_path}/run",
                   env={"PATH": str(tmp_path / "no-slurm-here")})
    one_error(proc, "sbatch is not on PATH")
    assert sorted(os.listdir(tmp_path)) == ["h100.yaml"]


@pytest.mark.parametrize("command,needle", [
    (["plan", "configs/base.yaml", "--gpus", "0"], "--gpus must be >= 1"),
    (["train", "configs/base.yaml", "--nproc-per-node", "-1"], "--nproc-per-node must be >= 0"),
    (["preprocess", "configs/prompts/shakespeare.txt", "--output-prefix", "{tmp}/out",
      "--train-bpe", "0"], "--train-bpe takes the vocabulary size"),
    (["submit", "configs/base.yaml", "--cluster", "{profile}", "--nodes", "0"],
     "--nodes must be >= 1"),
])
def test_impossible_command_line_values(tmp_path, command, needle):
    fill = {"tmp": tmp_path, "profile": h100_profile(tmp_path) if "submit" in command else ""}
    args = [a.format(**fill) for a in command] + [f"run_dir={tmp_path}/run"] * (
        command[0] in ("train", "submit"))
    one_error(cascade(*args), needle)
    assert sorted(os.listdir(tmp_path)) == (["h100.yaml"] if "submit" in command else [])


@pytest.mark.parametrize("case", ["tokenizer_is_text", "empty_input"])
def test_preprocess_refuses_before_writing(tmp_path, case):
    text, tok = tmp_path / "in.txt", tmp_path / "tok.txt"
    text.write_text("" if case == "empty_input" else "some text\n")
    tok.write_text("not a tokenizer\n")
    how = ["--tokenizer", tok] if case == "tokenizer_is_text" else ["--train-bpe", "300"]
    needle = "not a tokenizer file" if case == "tokenizer_is_text" else "the input is empty"
    one_error(cascade("preprocess", text, "--output-prefix", tmp_path / "out" / "ds", *how),
              needle)
    assert not (tmp_path / "out").exists()


def test_preprocess_says_how_much_text_was_not_utf8(tmp_path):
    text = tmp_path / "in.txt"
    text.write_bytes(b"good text \xff\xfe and more\n")
    proc = cascade("preprocess", text, "--output-prefix", tmp_path / "ds", "--train-bpe", "300")
    assert proc.returncode == 0, proc.stderr
    assert "warning: 2 bytes of the inputs are not UTF-8 text" in proc.stderr


LLAMA = ('{"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128, '
         '"num_attention_heads": 4, "num_key_value_heads": 4, "num_hidden_layers": 1, '
         '"vocab_size": 300, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, '
         '"max_position_embeddings": 128, "tie_word_embeddings": false}')


@pytest.mark.parametrize("case,needle", [
    ("config_json", "config.json: not a JSON file"),
    ("safetensors", "model.safetensors: not a safetensors file"),
    ("gguf", "not a GGUF file"),
])
def test_convert_refuses_files_that_are_not_what_they_say(tiny_run, tmp_path, case, needle):
    import shutil

    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_text('{"architectures": ' if case == "config_json" else LLAMA)
    shutil.copy(tiny_run / "tokenizer.json", src / "tokenizer.json")
    (src / "model.safetensors").write_bytes(os.urandom(1000))
    (tmp_path / "model.gguf").write_bytes(b"GGML" + os.urandom(100))
    direction, source = ("gguf-to-hf", tmp_path / "model.gguf") if case == "gguf" else \
        ("hf-to-mcore", src)
    one_error(cascade("convert", direction, source, tmp_path / "out"), needle)
    assert not (tmp_path / "out").exists()


def test_missing_dataset(tmp_path):
    proc = cascade("train", "configs/base.yaml", f"data.path={tmp_path}/nowhere",
                   f"run_dir={tmp_path}/run")
    one_error(proc, f"{tmp_path}/nowhere.bin")
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def _tiny_dataset(tmp_path, ids):
    from cascade_mega.data.indexed import write_indexed
    from cascade_mega.data.shakespeare import ensure_dataset
    from cascade_mega.data.tokenizer import CascadeTokenizer

    tok = CascadeTokenizer(os.path.join(os.path.dirname(ensure_dataset()), "tokenizer.json"))
    prefix = str(tmp_path / "tiny")
    write_indexed(prefix, [ids] * 50, tok)
    return prefix, tok


def test_token_id_beyond_vocabulary(tmp_path):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 8000, (300,), generator=gen).tolist() + [9000]
    prefix, _ = _tiny_dataset(tmp_path, ids)
    one_error(cascade("train", "configs/base.yaml", f"data.path={prefix}",
                      f"run_dir={tmp_path}/run"), "token id 9000", "tiny.bin")


def test_a_dataset_holding_the_mask_token(tmp_path):
    """The absorbing state as data would be a target of infinite loss: refused, named (ids 0 and
    1 are the end of document and [MASK] of the built-in tokenizer)."""
    gen = torch.Generator().manual_seed(1)
    _, tok = _tiny_dataset(tmp_path, [0])
    ids = torch.randint(2, 8000, (300,), generator=gen).tolist() + [tok.mask_id]
    prefix, _ = _tiny_dataset(tmp_path, ids)
    one_error(cascade("train", "configs/base.yaml", f"data.path={prefix}",
                      f"run_dir={tmp_path}/run"), "holds the mask token 50 times", "tiny.bin")


def test_truncated_bin(tmp_path):
    prefix, _ = _tiny_dataset(tmp_path, list(range(2, 302)))
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(os.path.getsize(prefix + ".bin") - 10)
    one_error(cascade("train", "configs/base.yaml", f"data.path={prefix}",
                      f"run_dir={tmp_path}/run"), "tiny.bin", "truncated")


def test_dataset_too_small_for_its_split(tmp_path):
    from cascade_mega.data.indexed import write_indexed

    _, tok = _tiny_dataset(tmp_path, list(range(2, 302)))
    prefix = str(tmp_path / "one_document")
    write_indexed(prefix, [list(range(2, 2000))], tok)  # one document: nothing to validate on
    one_error(cascade("train", "configs/base.yaml", f"data.path={prefix}",
                      f"run_dir={tmp_path}/run"), "one_document", "validation split")


def test_idx_of_another_bin(tmp_path):
    prefix, tok = _tiny_dataset(tmp_path, list(range(2, 302)))
    from cascade_mega.data.indexed import write_indexed

    other = str(tmp_path / "other")
    write_indexed(other, [list(range(2, 121))] * 50, tok)
    os.replace(other + ".idx", prefix + ".idx")  # an .idx that describes another .bin
    one_error(cascade("train", "configs/base.yaml", f"data.path={prefix}",
                      f"run_dir={tmp_path}/run"), "tiny.bin", "mismatched")


def test_corrupt_idx(tmp_path):
    prefix, _ = _tiny_dataset(tmp_path, list(range(2, 302)))
    with open(prefix + ".idx", "r+b") as f:
        f.write(b"NOT-AN-INDEX")
    one_error(cascade("train", "configs/base.yaml", f"data.path={prefix}",
                      f"run_dir={tmp_path}/run"), "tiny.idx")


def test_dataset_tokenised_with_another_vocabulary(tmp_path):
    prefix, _ = _tiny_dataset(tmp_path, list(range(2, 302)))
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    other = Tokenizer(models.BPE())
    other.pre_tokenizer = pre_tokenizers.ByteLevel()
    other.train_from_iterator(["a different corpus " * 50], trainers.BpeTrainer(vocab_size=300))
    other.save(str(tmp_path / "other.json"))
    one_error(cascade("train", "configs/base.yaml", f"data.path={prefix}",
                      f"data.tokenizer={tmp_path}/other.json", f"run_dir={tmp_path}/run"),
              "tiny", "tokenised with")


def test_fp8_without_transformer_engine(tmp_path):
    one_error(cascade("train", "configs/base.yaml", "train.fp8=e4m3",
                      f"run_dir={tmp_path}"), "train.fp8", "Transformer Engine")


def test_gpu_only_checks_run_where_the_job_runs(tmp_path):
    """The FP8 recipe is submitted, planned and swept from a host without a GPU or Transformer
    Engine: those are checked on the nodes (`runtime/machine.py`), which must have a GPU."""
    fp8 = "configs/recipes/qwen2.5_7b_h100_fp8.yaml"
    proc = cascade("submit", fp8, "--cluster", h100_profile(tmp_path), "--nodes", "8",
                   "--dry-run", f"run_dir={tmp_path}/fp8")
    assert proc.returncode == 0, proc.stderr
    assert "export CASCADE_EXPECT_GPU=1" in proc.stdout and "--gpus-per-node=8" in proc.stdout
    plan = cascade("plan", fp8, "--gpus", "64")
    assert plan.returncode == 0 and "total" in plan.stdout, plan.stderr
    one_error(cascade("train", "configs/base.yaml", "train.fp8=hybrid",
                      "train.fp8_bf16_first_layers=1", f"run_dir={tmp_path}/x"),
              "train.fp8_bf16_first_layers", "tensorwise")


def test_a_gpu_job_rank_without_a_gpu_stops_with_one_message(tmp_path):
    from cascade_mega.runtime import device

    saved = device.current()
    device.use(None)
    try:
        one_error(cascade("train", "configs/base.yaml", f"run_dir={tmp_path}",
                          env={"CASCADE_EXPECT_GPU": "1"}), "sees no CUDA device",
                  "GPU cluster profile")
    finally:
        device.use(saved)


def test_a_broken_transformer_engine_is_named(tmp_path, monkeypatch, capsys):
    """An installed Transformer Engine that fails to import (stand-in: a package raising OSError
    as a wrong CUDA build does; CUDA reported present) is named, not silently skipped."""
    import sys

    import torch

    from cascade_mega.runtime import te_support

    pkg = tmp_path / "transformer_engine"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "pytorch.py").write_text("raise OSError('libtransformer_engine.so: undefined symbol')")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    te_support._probe.cache_clear()
    try:
        assert not te_support.available()
        assert "undefined symbol" in te_support.import_error()
        with pytest.raises(RuntimeError, match="installed but does not import.*undefined symbol"):
            te_support.require("train.fp8")
        assert te_support.use_for_auto() is False
        assert "falls back to the local spec" in capsys.readouterr().err
    finally:
        te_support._probe.cache_clear()
        sys.modules.pop("transformer_engine", None)
        sys.modules.pop("transformer_engine.pytorch", None)


def test_complementary_needs_two_views(tmp_path):
    one_error(cascade("train", "configs/base.yaml", "diffusion.complementary=true",
                      f"run_dir={tmp_path}"), "diffusion.complementary")


TINY_RUN = ["configs/base.yaml", "model.num_layers=1", "model.hidden_size=64", "data.seq_len=32",
            "train.steps=1", "train.micro_batch_size=2", "train.global_batch_size=2",
            "train.eval_batches=0", "optimizer.warmup_steps=0", "tracking.enabled=false"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("gen") / "run"
    proc = cascade("train", *TINY_RUN, f"run_dir={run}")
    assert proc.returncode == 0, proc.stderr
    return run


class _Creates:
    """Unpickling it creates a file: what a crafted checkpoint would do, harmlessly."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def _crafted(tiny_run, tmp_path, where):
    """A copy of the run whose checkpoint carries the payload as its `.metadata`, or as the
    shard's common-state item (appended to `__0_0.distcp`, the metadata pointing at it). Its
    manifest is rewritten to match, as whoever crafts a checkpoint can: the checksums find
    damage, the unpickler's allow-list stops code."""
    import dataclasses
    import io
    import pickle
    import shutil

    from cascade_mega.train import manifest

    run, marker = tmp_path / where, tmp_path / f"{where}.created"
    shutil.copytree(tiny_run, run)
    ckpt = run / "checkpoints" / "iter_0000001"
    if where == "metadata":
        (ckpt / ".metadata").write_bytes(pickle.dumps(_Creates(marker)))
        manifest.write(str(ckpt))
        return run, marker
    metadata = pickle.loads((ckpt / ".metadata").read_bytes())  # our own file: trusted here
    payload = io.BytesIO()
    torch.save(_Creates(marker), payload)
    shard = ckpt / "__0_0.distcp"
    [index] = [i for i in metadata.storage_data if i.fqn.startswith("common_state")]
    metadata.storage_data[index] = dataclasses.replace(
        metadata.storage_data[index], relative_path=shard.name, offset=shard.stat().st_size,
        length=len(payload.getvalue()))
    with open(shard, "ab") as f:
        f.write(payload.getvalue())
    (ckpt / ".metadata").write_bytes(pickle.dumps(metadata))
    manifest.write(str(ckpt))
    return run, marker


@pytest.mark.parametrize("where", ["metadata", "shard"])
def test_a_checkpoint_that_would_run_code_is_refused_by_every_loader(tiny_run, tmp_path, where):
    """torch's checkpoint reader unpickles `.metadata` and a shard's non-tensor items without
    restriction; here each loading command refuses the payload, which never runs."""
    import shutil

    run, marker = _crafted(tiny_run, tmp_path, where)
    teacher = tmp_path / "teacher"  # the same checkpoint, its config saying AR (a teacher's)
    shutil.copytree(run, teacher)
    config = teacher / "config.yaml"
    config.write_text(config.read_text().replace("objective: block_diffusion", "objective: ar"))
    loaders = {
        "generate": ("generate", "--ckpt", run, "--prompt", "ROMEO:", "--max-new-tokens", "2"),
        "convert": ("convert", "mcore-to-hf", run, tmp_path / "hf"),
        "resume": ("train", *TINY_RUN, f"run_dir={run}", "train.steps=2"),
        "init_from": ("train", *TINY_RUN, f"run_dir={tmp_path}/fresh", f"train.init_from={run}"),
        "teacher": ("train", *TINY_RUN, f"run_dir={tmp_path}/student",
                    f"distill.teacher={teacher}"),
    }
    for name, args in loaders.items():
        one_error(cascade(*args), "refusing checkpoint", "which a checkpoint never holds")
        assert not marker.exists(), name


def test_generate_from_a_missing_checkpoint(tmp_path):
    one_error(cascade("generate", "--ckpt", f"{tmp_path}/nowhere", "--prompt", "ROMEO:"),
              f"{tmp_path}/nowhere")


def test_generate_from_an_incompatible_checkpoint(tiny_run, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(tiny_run, other)
    config = other / "config.yaml"
    config.write_text(config.read_text().replace("hidden_size: 64", "hidden_size: 96"))
    one_error(cascade("generate", "--ckpt", str(other), "--prompt", "ROMEO:"),
              "cannot load checkpoint", str(other))


@pytest.mark.parametrize("prompt,needle", [("", "prompt 0 is empty"),
                                           ("ROMEO " * 40, "the model's context is 32")])
def test_generate_rejects_empty_and_too_long_prompts(tiny_run, prompt, needle):
    proc = cascade("generate", "--ckpt", str(tiny_run), "--prompt", prompt)
    one_error(proc, needle)
    assert proc.stdout == ""  # the prompt is not echoed before its error


def test_generate_rejects_a_prompts_file_that_is_not_text(tiny_run, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"ROMEO:\n\xff\xfeJULIET\n")
    one_error(cascade("generate", "--ckpt", str(tiny_run), "--prompts-file", prompts),
              "not UTF-8 text (byte 7")


@pytest.mark.parametrize("option,needle", [
    (["--tau", "-1"], "tau must be > 0"), (["--policy", "threshold", "--remask", "0.3"],
                                           "remasking needs a step budget"),
    (["--order", "random"], "order 'random' decides a fixed count")])
def test_generate_rejects_impossible_policies(tiny_run, option, needle):
    one_error(cascade("generate", "--ckpt", str(tiny_run), "--prompt", "ROMEO:", *option), needle)
