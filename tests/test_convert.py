"""`cascade convert` against `transformers` as the reference (fp32, CPU): small random Llama
(grouped-query attention, untied embeddings, RoPE theta 50k), Qwen2 (grouped-query attention,
QKV biases, tied embeddings), Qwen3 (per-head query / key norms, a head dimension other than
hidden / heads), Qwen3-MoE (6 experts, top 2 renormalised, the first layer dense) and Qwen2-MoE
(6 experts, top 3, a gated shared expert, every second layer dense) models, converted to
megatron checkpoints, give the Hugging Face logits (the MoE ones also at expert parallel 2);
megatron -> Hugging Face -> megatron is bit-exact; the exported model's greedy tokens in
`transformers` are `cascade generate`'s; bad input leaves nothing behind."""

import json
import os

import pytest
import torch
import transformers  # the reference (installed by make setup)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tokenizer_file(path):
    """A byte-level BPE of 300 tokens with an end-of-document token and no [MASK] (the project
    appends it), like a Hugging Face model's own tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from cascade_mega.data.shakespeare import documents

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(list(documents())[:3], trainer=trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(path))


def hf_model(kind, folder):
    if kind == "smollm2":  # the real pretrained model, dequantized from its GGUF
        proc = convert("gguf-to-hf", "smollm2", str(folder))
        assert proc.returncode == 0, proc.stderr
        return transformers.AutoModelForCausalLM.from_pretrained(folder,
                                                                 dtype=torch.float32).eval()
    common = dict(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
                  max_position_embeddings=256, rms_norm_eps=1e-6)
    torch.manual_seed({"llama": 1, "qwen2": 2, "qwen3": 3, "qwen3_moe": 4, "qwen2_moe": 5}[kind])
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            **common, rope_theta=50000.0, tie_word_embeddings=False))
    elif kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
            **common, rope_theta=1e6, tie_word_embeddings=True))
    elif kind == "qwen3":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
            **common, head_dim=24, rope_theta=1e6, tie_word_embeddings=False))
    elif kind == "qwen3_moe":
        model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
            **common, head_dim=24, num_experts=6, num_experts_per_tok=2,
            moe_intermediate_size=40, norm_topk_prob=True, mlp_only_layers=[0]))
    else:
        model = transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
            **common, num_experts=6, num_experts_per_tok=3, moe_intermediate_size=48,
            shared_expert_intermediate_size=80, norm_topk_prob=False, decoder_sparse_step=2))
    with torch.no_grad():  # norms start at one, biases at zero: give them values a test sees;
        for name, p in model.named_parameters():  # and the routers logits far from ties
            if "norm" in name:
                p.normal_(1.0, 0.3)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.5)
            elif "mlp.gate." in name or "shared_expert_gate" in name:
                p.normal_(0.0, 1.0)
    model.save_pretrained(folder)
    tokenizer_file(folder / "tokenizer.json")
    return model.eval()


MOE = ["qwen3_moe", "qwen2_moe"]


@pytest.fixture(scope="module", params=["llama", "qwen2", "smollm2", "qwen3", *MOE])
def converted(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    model = hf_model(request.param, root / "hf")
    experts = ["--expert", "2"] if request.param in MOE else []  # a target layout with EP
    proc = convert("hf-to-mcore", str(root / "hf"), str(root / "mc"), "--seq-len",
                   "64", "--tensor", str(converted_tensor(request.param)), "--pipeline", "2",
                   *experts)
    assert proc.returncode == 0, proc.stderr
    return request.param, root, model


def tensor_size(kind):
    """SmolLM2-135M's 9 heads in 3 query groups split over 3 tensor-parallel ranks, not 2."""
    return 3 if kind == "smollm2" else 2


def converted_tensor(kind):
    """SmolLM2 is converted at TP 1 and resharded to TP 3 by mcore-to-mcore; the others are
    converted for TP 2 directly."""
    return 1 if kind == "smollm2" else 2


def convert(*args):
    """`cascade convert ...` in this process (no interpreter start-up per call)."""
    from helpers import cascade

    return cascade("convert", *args)


def megatron_logits(run, ids):
    """AR logits of `ids` through the converted megatron model (one process)."""
    from cascade_mega.diffusion.masks import AttentionLayout
    from cascade_mega.inference.load import load_decoder
    from cascade_mega.model.gpt import read_out_logits

    model = load_decoder(str(run), precision="fp32").net.model
    L = ids.shape[1]

    def logits(*, hidden_states, output_layer, output_weight, **_):
        return read_out_logits(hidden_states, output_layer, output_weight, None, True)

    with torch.no_grad():
        out = model(ids, torch.arange(L).expand_as(ids), AttentionLayout("causal", L),
                    output_processor=logits)
    return out.transpose(0, 1).double()


def padded(V, kind):
    # 128 rows per rank at every tensor size the query groups allow (SmolLM2: 3 groups, 1 or 3;
    # the small models: 2 groups, 1 or 2)
    multiple = 128 * (3 if kind == "smollm2" else 2)
    return (V + 1 + multiple - 1) // multiple * multiple  # + [MASK]


def test_megatron_logits_equal_the_hugging_face_logits(converted):
    kind, root, model = converted
    V = model.config.vocab_size
    ids = torch.randint(0, V, (2, 48), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model(ids).logits.double()
    got = megatron_logits(root / "mc", ids)
    assert got.shape[-1] == padded(V, kind)
    assert ref.abs().max() > 1.0  # logits large enough for the tolerance to mean something
    assert (got[..., :V] - ref).abs().max() < 1e-4
    assert (got[..., V + 1:] == 0).all()  # padding rows are zero (never predicted, like [MASK])
    cfg = (root / "mc" / "config.yaml").read_text()
    tied = str(model.config.tie_word_embeddings).lower()
    assert f"tensor: {converted_tensor(kind)}" in cfg and "pipeline: 2" in cfg and \
        f"tie_embeddings: {tied}" in cfg
    assert f"qkv_bias: {'true' if kind in ('qwen2', 'qwen2_moe') else 'false'}" in cfg
    assert f"qk_norm: {'true' if kind.startswith('qwen3') else 'false'}" in cfg
    assert f"expert: {2 if kind in MOE else 1}" in cfg


@pytest.mark.parametrize("converted", ["llama", "qwen2", "smollm2"], indirect=True)
def test_logits_equal_at_tensor_parallel(converted, tmp_path):
    """The converted checkpoint loaded at TP = 2, one process per rank, through the trainer's own
    set-up (`train.init_from`), gives the Hugging Face logits of a validation batch. SmolLM2
    (converted at TP 1, 49,536 embedding rows) is first resharded to TP 3 by `mcore-to-mcore`,
    and its logits are also those of the TP 1 checkpoint in one process."""
    _logits_at(converted, tmp_path, tensor_size(converted[0]), 1)


@pytest.mark.parametrize("converted", ["qwen2"], indirect=True)
def test_logits_equal_at_pipeline_parallel(converted, tmp_path):
    """The same at PP = 2 with tied embeddings (Qwen2), whose output layer on the last stage is
    a copy of the first stage's table (untied ones at PP: the training layouts' tests)."""
    _logits_at(converted, tmp_path, 1, 2)


@pytest.mark.parametrize("converted", MOE, indirect=True)
def test_logits_equal_at_expert_parallel(converted, tmp_path):
    """The MoE models at EP = 2 (two data-parallel ranks, each with half the experts; the tokens
    travel by megatron-core's all-to-all)."""
    _logits_at(converted, tmp_path, 1, 1, expert=2)


def _logits_at(converted, tmp_path, tensor, pipeline, expert=1):
    from cascade_mega.data.shakespeare import documents

    kind, root, model = converted
    source = root / "mc"
    if tensor == 3:
        source = tmp_path / "tp3"
        proc = convert("mcore-to-mcore", str(root / "mc"), str(source), "--tensor", "3")
        assert proc.returncode == 0, proc.stderr
        assert "tensor: 3" in (source / "config.yaml").read_text()
    plays = root / "plays"
    if not os.path.exists(f"{plays}.idx"):  # Shakespeare in this model's tokenizer, once
        from helpers import cascade

        corpus = root / "plays.txt"
        corpus.write_text(list(documents())[4][:30000])
        assert cascade("preprocess", corpus, "--output-prefix", plays, "--tokenizer",
                       root / "mc" / "tokenizer.json", "--lines").returncode == 0
    out = tmp_path / "logits.pt"
    from helpers import torchrun

    world = max(tensor, expert) * pipeline
    proc = torchrun(world, "tests/logits_at_layout.py", out,
                    source / "config.yaml", f"data.path={plays}",
                    f"train.init_from={source}", "train.resume=none", f"run_dir={tmp_path}/run",
                    f"parallel.tensor={tensor}", f"parallel.pipeline={pipeline}",
                    f"parallel.expert={expert}", "parallel.sequence_parallel=false",
                    "train.micro_batch_size=2",
                    f"train.global_batch_size={2 * world // (tensor * pipeline)}",
                    "tracking.enabled=false", "data.split=80,20,0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    got, ids = torch.load(out)[0], torch.load(str(out) + ".ids")[0]
    with torch.no_grad():
        ref = model(ids).logits.double()
    err = (got[..., :model.config.vocab_size] - ref).abs()
    if tensor > 1:
        # the tensor-parallel all-reduces sum in another order than one process: fp32 rounding
        # through SmolLM2's 30 layers reaches 3e-4 on logits of up to ~35, so the bound is
        # 1e-4 of each position's logit scale there (one process is bit-exact, see above)
        err = err / ref.abs().amax(-1, keepdim=True).clamp(min=1.0)
    assert err.max() < 1e-4
    if tensor == 3:  # against the checkpoint it was resharded from, at TP 1
        one = megatron_logits(root / "mc", ids)
        rel = (got - one).abs() / one.abs().amax(-1, keepdim=True).clamp(min=1.0)
        assert got.shape == one.shape and rel.max() < 1e-4


@pytest.fixture(scope="module")
def exported(converted):
    """megatron -> Hugging Face -> megatron."""
    kind, root, _ = converted
    back, again = root / "hf_back", root / "mc_again"
    for args in (("mcore-to-hf", root / "mc", back), ("hf-to-mcore", back, again)):
        proc = convert(*map(str, args))
        assert proc.returncode == 0, proc.stderr
    return back, again


def test_megatron_hf_megatron_round_trip_is_bit_exact(converted, exported):
    kind, root, model = converted
    back, again = exported
    first, second = _weights(root / "mc"), _weights(again)
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name
    hf = json.loads((back / "config.json").read_text())
    assert hf["vocab_size"] == padded(model.config.vocab_size, kind) and hf["cascade"] == {
        "objective": "ar", "block_size": 1, "shifted_prediction": False, "loss": "ce",
        "clean_stream": "block_causal", "ar_loss_weight": 0.0}


@pytest.mark.parametrize("converted", ["qwen2_moe"], indirect=True)
def test_the_fused_expert_layout_converts_to_the_same_weights(converted, tmp_path):
    """The layout recent `transformers` can save (per layer one `experts.gate_up_proj`
    [E, 2f, h] and one `experts.down_proj` [E, h, f]) gives the per-expert layout's weights."""
    import shutil

    from safetensors.torch import load_file, save_file

    kind, root, model = converted
    fused = tmp_path / "fused"
    shutil.copytree(root / "hf", fused)
    state = load_file(fused / "model.safetensors")
    E = model.config.num_experts
    for i in range(model.config.num_hidden_layers):
        p = f"model.layers.{i}.mlp.experts."
        if f"{p}0.gate_proj.weight" not in state:
            continue  # a dense layer
        state[p + "gate_up_proj"] = torch.stack([torch.cat(
            [state.pop(f"{p}{e}.gate_proj.weight"), state.pop(f"{p}{e}.up_proj.weight")])
            for e in range(E)])
        state[p + "down_proj"] = torch.stack([state.pop(f"{p}{e}.down_proj.weight")
                                              for e in range(E)])
    save_file(state, fused / "model.safetensors", metadata={"format": "pt"})
    proc = convert("hf-to-mcore", str(fused), str(tmp_path / "mc"), "--seq-len", "64")
    assert proc.returncode == 0, proc.stderr
    first, second = _weights(root / "mc"), _weights(tmp_path / "mc")
    assert first.keys() == second.keys() and any(".local_experts." in k for k in first)
    assert all(torch.equal(first[k], second[k]) for k in first)


def _weights(run):
    from cascade_mega.inference.load import load_decoder

    model = load_decoder(str(run), precision="fp32").net.model
    return {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def test_exported_model_generates_the_same_greedy_tokens_in_transformers(converted, exported):
    kind, root, _ = converted
    back = exported[0]
    prompt = "ROMEO: But soft"
    from helpers import cascade

    ours = cascade("generate", "--ckpt", str(root / "mc"), "--prompt", prompt,
                   "--max-new-tokens", "20", "--precision", "fp32", "--json")
    assert ours.returncode == 0, ours.stderr
    record = json.loads(ours.stdout.strip().splitlines()[-1])
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(back / "tokenizer.json"))
    model = transformers.AutoModelForCausalLM.from_pretrained(back, dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode(prompt)])
    out = model.generate(ids, max_new_tokens=20, do_sample=False)[0, ids.shape[1]:].tolist()
    assert len(record["tokens"]) >= 10 and out[:len(record["tokens"])] == record["tokens"]
    assert len(record["tokens"]) == 20 or out[len(record["tokens"])] == tok.convert_tokens_to_ids(
        "<|endoftext|>")  # both stop at the end of the document


@pytest.mark.parametrize("case,needle", [
    ("architecture", "architecture GPT2LMHeadModel is not supported"),
    ("shapes", "the checkpoint's shapes do not match its config.json: "
               "decoder.layers.0.self_attention.linear_qkv.weight is [128, 64], the config makes "
               "it [96, 64]"),
    ("layout", "'parallel.tensor' = 3 does not divide 'model.num_attention_heads' = 4"),
])
def test_bad_input_is_one_message_and_leaves_nothing(tmp_path, case, needle):
    src = tmp_path / "hf"
    hf_model("llama", src)
    hf = json.loads((src / "config.json").read_text())
    extra = []
    if case == "architecture":
        hf["architectures"] = ["GPT2LMHeadModel"]
    elif case == "shapes":
        hf["num_key_value_heads"] = 1  # the k/v projections on disk are for 2 groups
    else:
        extra = ["--tensor", "3"]
    (src / "config.json").write_text(json.dumps(hf))
    proc = convert("hf-to-mcore", str(src), str(tmp_path / "out"), *extra)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and needle in err[0], proc.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_mcore_to_mcore_writes_the_run_at_a_layout_that_divides_it(tmp_path):
    hf_model("llama", tmp_path / "hf")
    root = tmp_path
    assert convert("hf-to-mcore", tmp_path / "hf", tmp_path / "mc").returncode == 0
    proc = convert("mcore-to-mcore", str(root / "mc"), str(tmp_path / "moved"),
                   "--tensor", "2", "--pipeline", "4")
    assert proc.returncode == 0, proc.stderr
    cfg = (tmp_path / "moved" / "config.yaml").read_text()
    assert "tensor: 2" in cfg and "pipeline: 4" in cfg
    assert f"tokenizer: {tmp_path}/moved/tokenizer.json" in cfg
    assert (tmp_path / "moved" / "checkpoints" / "latest").read_text() == "iter_0000000\n"
    bad = convert("mcore-to-mcore", str(root / "mc"), str(tmp_path / "pp3"),
                  "--pipeline", "3")
    assert bad.returncode == 2 and "'parallel.pipeline' = 3 does not divide " \
        "'model.num_layers' = 4" in bad.stderr
    assert not (tmp_path / "pp3").exists() and not (tmp_path / "pp3.partial").exists()



def test_megatron_style_convert_tool_runs_from_a_source_checkout(tmp_path):
    """`tools/checkpoint/convert.py` with Megatron's flags (--loader / --saver / --load-dir /
    --save-dir / --target-*-parallel-size), from a copy of the sources."""
    from helpers import run_python, source_checkout

    src = source_checkout(tmp_path / "src")
    hf_model("llama", tmp_path / "hf")
    proc = run_python("tools/checkpoint/convert.py", "--model-type", "GPT", "--loader",
                      "llama_mistral", "--saver", "mcore", "--load-dir", tmp_path / "hf",
                      "--save-dir", tmp_path / "mc", "--target-tensor-parallel-size", "2",
                      "--seq-len", "64", cwd=src)
    assert proc.returncode == 0, proc.stderr
    cfg = (tmp_path / "mc" / "config.yaml").read_text()
    assert "tensor: 2" in cfg and "seq_len: 64" in cfg
    back = run_python("tools/checkpoint/convert.py", "--loader", "mcore", "--saver", "hf",
                      "--load-dir", tmp_path / "mc", "--save-dir", tmp_path / "back", cwd=src)
    assert back.returncode == 0, back.stderr
    a = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").state_dict()
    b = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").state_dict()
    assert all(torch.equal(a[k], b[k][:a[k].shape[0]]) for k in a)
    bad = run_python("tools/checkpoint/convert.py", "--loader", "gguf", "--saver", "mcore",
                     "--load-dir", "x", "--save-dir", tmp_path / "no", cwd=src)
    assert bad.returncode == 2 and "no conversion from --loader gguf to --saver mcore" in \
        bad.stderr


@pytest.mark.parametrize("converted", ["llama", "qwen2"], indirect=True)
def test_a_causal_clean_stream_conversion_is_the_ar_model(converted):
    """Converted to block diffusion with a causal clean stream (`--clean-stream causal`): at step
    0 the clean rows of the training layout [x_t ; x_0] give the Hugging Face logits of x_0
    whatever x_t holds, and speculative greedy decoding (the diffusion stream drafts, the causal
    stream verifies) gives `transformers`' own greedy `generate`, token for token."""
    from cascade_mega.diffusion.masks import AttentionLayout
    from cascade_mega.inference.load import load_decoder
    from cascade_mega.inference.policies import Policy
    from cascade_mega.model.gpt import read_out_logits

    kind, root, model = converted
    run = root / "mc_causal"
    proc = convert("hf-to-mcore", str(root / "hf"), str(run), "--seq-len", "64", "--objective",
                   "block_diffusion", "--block-size", "4", "--clean-stream", "causal")
    assert proc.returncode == 0, proc.stderr
    decoder = load_decoder(str(run), precision="fp32")
    V, L = model.config.vocab_size, 48
    g = torch.Generator().manual_seed(6)
    x_0 = torch.randint(0, V, (2, L), generator=g)
    x_t = torch.where(torch.rand(2, L, generator=g) < 0.5, decoder.net.mask_id, x_0)

    def logits(*, hidden_states, output_layer, output_weight, **_):
        return read_out_logits(hidden_states, output_layer, output_weight, None, True)

    with torch.no_grad():
        ref = model(x_0).logits.double()
        got = decoder.net.model(torch.cat([x_t, x_0], 1), torch.arange(L).repeat(2)[None],
                                AttentionLayout("block_diffusion", L, 4, clean_stream="causal"),
                                output_processor=logits).transpose(0, 1).double()
    assert (got[:, L:, :V] - ref).abs().max() < 1e-4 < ref.abs().max()
    prompts = [decoder.net.tok.encode(p) for p in ("ROMEO: But soft", "JULIET:")]
    eod = decoder.net.tok.eod
    for prompt, ours in zip(prompts, decoder.generate(prompts, 20, Policy("speculative",
                                                                         steps=2))):
        ids = torch.tensor([prompt])
        out = model.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=eod,
                             pad_token_id=eod)[0, ids.shape[1]:].tolist()
        assert ours.tokens == out[:len(ours.tokens)] and len(ours.tokens) >= 5
        assert len(ours.tokens) == 20 or out[len(ours.tokens)] == eod
