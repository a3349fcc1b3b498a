"""The bad-input table of `test_bad_input.py`: every case is one command line that must end with
one clear message (exit 2, one `cascade: error:` line holding the needle, no traceback), having
written nothing: neither a new file anywhere under its own directory ({tmp}) nor a change to the
inputs ({inp}) or to the tiny trained run ({run}) it reads.

A case is (id, arguments, needle[, environment]); {tmp}, {inp}, {run} and {profile} (the h100
cluster profile) are filled in. A `train` case without `run_dir=` trains into {tmp}/run.
"""

import os
import shutil

import torch

from helpers import ONE_STEP, h100_profile

S = "configs/base.yaml"
TINY = ONE_STEP
LLAMA = ('{"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128, '
         '"num_attention_heads": 4, "num_key_value_heads": 4, "num_hidden_layers": 1, '
         '"vocab_size": 300, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, '
         '"max_position_embeddings": 128, "tie_word_embeddings": false}')

CASES = [
    # train
    ("train-unknown-key", ["train", S, "model.num_layrs=3"],
     "override 'model.num_layrs=3': unknown config key"),
    ("train-unknown-key-yaml", ["train", "{inp}/badkey.yaml"],
     "{inp}/badkey.yaml: unknown config key 'train.stepz' (did you"),
    ("train-yaml-syntax", ["train", "{inp}/syntax.yaml"],
     "config {inp}/syntax.yaml: line 3, column 1: not valid YAML (did"),
    ("train-section-list", ["train", "{inp}/section_list.yaml"],
     "config {inp}/section_list.yaml: 'model' must be a mapping of"),
    ("train-top-list", ["train", "{inp}/top_list.yaml"],
     "config {inp}/top_list.yaml: holds a list, not a mapping of"),
    ("train-config-missing", ["train", "{inp}/nowhere.yaml"],
     "config file not found: {inp}/nowhere.yaml"),
    ("train-config-is-dir", ["train", "{inp}"],
     "config file not found: {inp}"),
    ("train-wrong-type", ["train", S, "train.steps=many"],
     "override 'train.steps=many': wrong type for 'train.steps':"),
    ("train-override-no-value", ["train", S, "train.steps="],
     "override 'train.steps=' gives 'train.steps' no value (write"),
    ("train-override-section", ["train", S, "model=3"],
     "override 'model=3': 'model' is a section; set its keys"),
    ("train-override-bad-key", ["train", S, "=3"],
     "override '=3' is not of the form key=value"),
    ("train-vocab-small", ["train", S, *TINY, "model.vocab_size=10"],
     "'model.vocab_size' = 10 is smaller than the tokenizer's 8192"),
    ("train-block-size", ["train", S, "diffusion.block_size=7"],
     "'diffusion.block_size' = 7 does not divide 'data.seq_len' = 256"),
    ("train-tensor", ["train", S, "parallel.tensor=3"],
     "'parallel.tensor' = 3 does not divide 'model.num_attention_heads"),
    ("train-gbs", ["train", S, "train.global_batch_size=12"],
     "'train.global_batch_size' = 12 is not a multiple of"),
    ("train-moe-pattern", ["train", S, "model.moe.num_experts=4", "model.moe.pattern=[1,0]"],
     "'model.moe.pattern' has 2 entries for 'model.num_layers' = 4"),
    ("train-moe-dense", ["train", S, "model.moe.num_experts=4", "model.moe.first_dense_layers=4"],
     "'model.moe' leaves no layer with experts ('model.moe.pattern' /"),
    ("train-moe-bias", ["train", S, "model.moe.num_experts=4", "model.moe.expert_bias=true"],
     "'model.moe.expert_bias' (aux-loss-free balancing) needs"),
    ("train-moe-topk", ["train", S, "model.moe.num_experts=4", "model.moe.top_k=1"],
     "'model.moe.top_k' = 1 with 'model.moe.norm_topk_prob' gives"),
    ("train-moe-typo", ["train", S, "model.moe.num_experts=4", "model.moe.score_functio=sigmoid"],
     "override 'model.moe.score_functio=sigmoid': unknown config key"),
    ("train-lr-negative", ["train", S, "optimizer.lr=-0.001"],
     "'optimizer.lr' must be positive, got -0.001"),
    ("train-beta2", ["train", S, "optimizer.beta2=1.5"],
     "'optimizer.beta1' = 0.9 and 'optimizer.beta2' = 1.5 must be in"),
    ("train-query-groups", ["train", S, "model.num_query_groups=0"],
     "'model.num_query_groups' must be positive (null: one per head),"),
    ("train-keep-last", ["train", S, "checkpoint.keep_last=-1"],
     "'checkpoint.keep_last' must be >= 1 (null keeps every"),
    ("train-on-corrupt", ["train", S, "checkpoint.on_corrupt=maybe"],
     "'checkpoint.on_corrupt' = 'maybe'; expected one of fallback,"),
    ("train-steps-zero", ["train", S, "train.steps=0"],
     "'train.steps' must be positive, got 0"),
    ("train-seq-len-zero", ["train", S, "data.seq_len=0"],
     "'data.seq_len' must be positive, got 0"),
    ("train-heads", ["train", S, "model.num_attention_heads=5"],
     "'model.num_attention_heads' = 5 does not divide"),
    ("train-pipeline", ["train", S, "parallel.pipeline=3"],
     "'parallel.pipeline' = 3 does not divide 'model.num_layers' = 4"),
    ("train-mbs-zero", ["train", S, "train.micro_batch_size=0"],
     "'train.micro_batch_size' must be positive, got 0"),
    ("train-warmup-negative", ["train", S, "optimizer.warmup_steps=-1"],
     "'optimizer.min_lr', 'optimizer.weight_decay',"),
    ("train-complementary", ["train", S, "diffusion.complementary=true"],
     "'diffusion.complementary' needs 'diffusion.views' = 2, got 1"),
    ("train-fp8", ["train", S, "train.fp8=e4m3"],
     "'train.fp8' = e4m3 needs Transformer Engine on a CUDA GPU; this"),
    ("train-fp8-first", ["train", S, "train.fp8=hybrid", "train.fp8_bf16_first_layers=1"],
     "'train.fp8_bf16_first_layers' / 'train.fp8_bf16_last_layers'"),
    ("train-tracking-uri", ["train", S, "tracking.uri=htp://127.0.0.1:5000"],
     "'tracking.uri' = 'htp://127.0.0.1:5000' is not a tracking"),
    ("train-tracking-uri-port", ["train", S, "tracking.uri=http://127.0.0.1:notaport"],
     "'tracking.uri' = 'http://127.0.0.1:notaport' is not a tracking"),
    ("train-tracking-uri-path", ["train", S, "tracking.uri=mlruns"],
     "'tracking.uri' = 'mlruns' is not a tracking store: expected"),
    ("train-experiment-empty", ["train", S, "tracking.experiment= "],
     "override 'tracking.experiment= ' gives 'tracking.experiment' no"),
    ("train-max-buffer", ["train", S, "tracking.max_buffer=0"],
     "'tracking.max_buffer' must be positive"),
    ("train-samples", ["train", S, "tracking.samples=-1"],
     "'tracking.samples' must be >= 0 and 'tracking.sample_tokens' > 0"),
    ("train-nproc", ["train", S, "--nproc-per-node", "-1"],
     "--nproc-per-node must be >= 0 and --nnodes >= 1, got -1 and 1"),
    ("train-nnodes", ["train", S, "--nnodes", "0"],
     "--nproc-per-node must be >= 0 and --nnodes >= 1, got 0 and 0"),
    ("train-unknown-option", ["train", S, "--nprocs", "2"],
     "cascade: unrecognized arguments: --nprocs 2 run_dir={tmp}/run"),
    ("train-heartbeat", ["train", S, "train.heartbeat_s=0"],
     "'train.heartbeat_s' must be positive"),
    ("train-clean-stream-ar", ["train", S, "diffusion.objective=ar", "diffusion.clean_stream=causal"],
     "'diffusion.clean_stream' = causal is a layout of block diffusion; 'diffusion.objective' = ar has no clean stream"),
    ("train-clean-stream-full", ["train", S, "data.seq_len=32", "diffusion.block_size=32", "diffusion.clean_stream=causal"],
     "'diffusion.clean_stream' = causal: at 'diffusion.block_size' = 'data.seq_len' = 32 (full diffusion) there is no clean stream"),
    ("train-stop-grace", ["train", S, "--nproc-per-node", "2", "train.stop_grace_s=0"],
     "'train.stop_grace_s' must be positive (seconds)"),
    ("train-exit-interval", ["train", S, "train.exit_interval=-3"],
     "'train.exit_interval' must be >= 1 (null: never), got -3"),
    ("train-data-missing", ["train", S, "data.path={inp}/nowhere"],
     "dataset file not found: {inp}/nowhere.bin"),
    ("train-data-beyond-vocab", ["train", S, "data.path={inp}/beyond"],
     "{inp}/beyond.bin holds token id 9000 but the vocabulary has"),
    ("train-data-mask-token", ["train", S, "data.path={inp}/mask"],
     "{inp}/mask.bin holds the mask token 50 times: a target no model"),
    ("train-data-truncated", ["train", S, "data.path={inp}/truncated"],
     "{inp}/truncated.bin has 29990 bytes but its .idx describes"),
    ("train-data-one-document", ["train", S, "data.path={inp}/one_document"],
     "{inp}/one_document: data.split '95,5,0' leaves the validation"),
    ("train-data-idx-of-other", ["train", S, "data.path={inp}/mismatch"],
     "{inp}/mismatch.bin has 30000 bytes but its .idx describes"),
    ("train-data-corrupt-idx", ["train", S, "data.path={inp}/badidx"],
     "{inp}/badidx.idx cannot be read: bad header, cannot read:"),
    ("train-data-other-vocab", ["train", S, "data.path={inp}/good", "data.tokenizer={inp}/other_tok.json"],
     "{inp}/good: dataset was tokenised with {inp}/good.tokenizer.json"),
    ("train-tokenizer-missing", ["train", S, "data.tokenizer={inp}/nowhere.json"],
     "tokenizer file not found: {inp}/nowhere.json"),
    ("train-tokenizer-text", ["train", S, "data.tokenizer={inp}/tok.txt"],
     "{inp}/tok.txt: not a tokenizer file (a tokenizer.json of the"),
    ("train-resume-missing", ["train", S, *TINY, "train.resume={inp}/nowhere"],
     "{inp}/nowhere: no such checkpoint"),
    ("train-resume-damaged", ["train", S, *TINY, "train.resume={inp}/damaged/checkpoints/iter_0000001"],
     "checkpoint {inp}/damaged/checkpoints/iter_0000001 is damaged:"),
    ("train-resume-damaged-stop", ["train", S, *TINY, "run_dir={inp}/damaged", "checkpoint.on_corrupt=stop", "train.steps=2"],
     "checkpoint {inp}/damaged/checkpoints/iter_0000001 is damaged:"),
    ("train-init-from-missing", ["train", S, *TINY, "train.init_from={inp}/nowhere"],
     "{inp}/nowhere: no such run directory or checkpoint"),
    ("train-init-from-damaged", ["train", S, *TINY, "train.init_from={inp}/damaged/checkpoints/iter_0000001"],
     "checkpoint {inp}/damaged/checkpoints/iter_0000001 is damaged:"),
    ("train-init-from-other-model", ["train", S, *TINY, "model.hidden_size=96", "train.init_from={run}"],
     "'train.init_from' = {run}/checkpoints/iter_0000001 holds"),
    ("train-teacher-missing", ["train", S, *TINY, "distill.teacher={inp}/nowhere"],
     "'distill.teacher': {inp}/nowhere: no such run directory or"),
    ("train-run-dir-is-file", ["train", S, *TINY, "run_dir={inp}/tok.txt"],
     "'run_dir' = {inp}/tok.txt is a file, not a directory"),
    ("train-objective", ["train", S, "diffusion.objective=mdlm"],
     "'diffusion.objective' = 'mdlm' is not a registered objective; registered: ar, block_diffusion"),
    ("train-noise-sampling", ["train", S, "diffusion.noise_sampling=sobol"],
     "'diffusion.noise_sampling' = 'sobol'; expected one of"),
    ("train-precision", ["train", S, "train.precision=fp13"],
     "'train.precision' = 'fp13'; expected one of auto, fp32, bf16"),
    ("train-decay", ["train", S, "optimizer.decay_style=step"],
     "'optimizer.decay_style' = 'step'; expected one of cosine,"),
    ("train-split", ["train", S, "data.split=abc"],
     "'data.split' = 'abc': expected up to three non-negative weights"),
    ("train-backend", ["train", S, "data.backend=arrow"],
     "'data.backend' = 'arrow'; expected one of megatron, dali"),
    ("train-context", ["train", S, "parallel.context=3"],
     "'parallel.context' = 3 cuts 'data.seq_len' = 256 into 2 x 3"),
    ("train-recompute", ["train", S, "model.recompute=some"],
     "'model.recompute' = 'some'; expected one of none, full"),
    ("train-nonfinite", ["train", S, "train.nonfinite=ignore"],
     "'train.nonfinite' = 'ignore'; expected one of stop, skip"),
    ("train-kernel", ["train", S, "model.attention_kernel=fast"],
     "'model.attention_kernel' = 'fast'; expected one of auto, tiled,"),
    ("train-experts-negative", ["train", S, "model.moe.num_experts=-1"],
     "'model.moe.num_experts' must be >= 1, got -1"),
    ("train-bool", ["train", S, "diffusion.complementary=maybe"],
     "override 'diffusion.complementary=maybe': wrong type for"),
    ("train-list-for-int", ["train", S, "train.steps=[1,2]"],
     "override 'train.steps=[1,2]': wrong type for 'train.steps':"),
    ("train-score-entropy-ar", ["train", S, "diffusion.loss=score_entropy",
                                "diffusion.objective=ar"],
     "'diffusion.loss' = score_entropy is a diffusion loss;"),
    ("train-score-entropy-ar-phase", ["train", S, "diffusion.loss=score_entropy",
                                      "diffusion.shifted_prediction=true",
                                      "diffusion.block_size_schedule={0: 1, 10: 16}"],
     "'diffusion.loss' = score_entropy cannot train the AR phase"),
    ("train-schedule-out-of-order", ["train", S, "diffusion.block_size=16",
                                     "diffusion.block_size_schedule={0: 4, 40: 16, 20: 8}"],
     "'diffusion.block_size_schedule' lists its steps [0, 40, 20] out of order"),
    ("train-context-full", ["train", S, "diffusion.block_size=256", "parallel.context=3"],
     "'parallel.context' = 3 cuts 'data.seq_len' = 256 into 2 x 3 chunks: seq_len must be a "
     "multiple of 2 x context = 6"),
    ("train-loss-unknown", ["train", S, "diffusion.loss=sedd"],
     "'diffusion.loss' = 'sedd'; expected one of ce, score_entropy"),
    ("train-complementary-clipped", ["train", S, "diffusion.views=2",
                                     "diffusion.complementary=true", "diffusion.t_min=0.3",
                                     "diffusion.t_max=0.8"],
     "'diffusion.complementary' gives the second view the noise level 1 - t"),
    ("train-t-floor", ["train", S, "diffusion.t_floor=1.5"],
     "'diffusion.t_floor' must be in [0, t_max), got 1.5"),
    ("train-schedule-search-empty", ["train", S, "diffusion.schedule_search.interval=100",
                                     "diffusion.schedule_search.candidates=[]"],
     "'diffusion.schedule_search.candidates' is empty: give at least one [t_min, t_max]"),
    ("train-schedule-search-range", ["train", S, "diffusion.schedule_search.interval=100",
                                     "diffusion.schedule_search.candidates=[[0.9,0.2]]"],
     "'diffusion.schedule_search.candidates': [0.9, 0.2] is not a range [t_min, t_max]"),
    ("train-schedule-search-ar", ["train", S, "diffusion.schedule_search.interval=100",
                                  "diffusion.objective=ar"],
     "'diffusion.schedule_search' searches the noise range of block diffusion;"),
    ("train-schedule-search-complementary", ["train", S, "diffusion.schedule_search.interval=100",
                                             "diffusion.views=2", "diffusion.complementary=true"],
     "'diffusion.complementary' needs symmetric ranges (t_min = 1 - t_max)"),
    ("train-time-conditioning-ar", ["train", S, "model.time_conditioning=true",
                                    "diffusion.objective=ar"],
     "'model.time_conditioning' embeds the noise level of a block; 'diffusion.objective' = ar"),
    ("train-time-conditioning-clipped", ["train", S, "model.time_conditioning=true",
                                         "diffusion.t_min=0.3"],
     "'model.time_conditioning' embeds the noise level of a block, but training draws it in "
     "[0.3, 1.0]"),
    ("train-resample-no-count", ["train", S, "diffusion.block_size=4", "diffusion.t_min=0.3",
                                 "diffusion.t_max=0.45", "diffusion.resample=true"],
     "'diffusion.resample': no masked count of a block of 4 has its fraction in [0.3, 0.45]"),
    ("train-time-conditioning-search", ["train", S, "model.time_conditioning=true",
                                        "diffusion.schedule_search.interval=100",
                                        "diffusion.schedule_search.candidates=[[0.0,1.0],[0.2,0.8]]"],
     "but training draws it in [0.2, 0.8] ('diffusion.t_min' / 't_max' or a range "
     "'diffusion.schedule_search' may choose)"),
    # generate
    ("generate-missing", ["generate", "--ckpt", "{inp}/nowhere", "--prompt", "ROMEO:"],
     "{inp}/nowhere: no such run directory or checkpoint"),
    ("generate-no-checkpoint", ["generate", "--ckpt", "{inp}/norun", "--prompt", "ROMEO:"],
     "{inp}/norun: the run has no complete checkpoint yet"),
    ("generate-damaged", ["generate", "--ckpt", "{inp}/damaged/checkpoints/iter_0000001", "--prompt", "ROMEO:"],
     "checkpoint {inp}/damaged/checkpoints/iter_0000001 is damaged:"),
    ("generate-other-model", ["generate", "--ckpt", "{inp}/other", "--prompt", "ROMEO:"],
     "cannot load checkpoint {inp}/other/checkpoints/iter_0000001:"),
    ("generate-speculative-untrained", ["generate", "--ckpt", "{run}", "--prompt", "ROMEO:", "--policy", "speculative"],
     "--policy speculative needs a causal clean stream trained for next-token prediction (diffusion.clean_stream=causal with diffusion.ar_loss_weight > 0); this model has a block_causal clean stream"),
    ("generate-empty-prompt", ["generate", "--ckpt", "{run}", "--prompt", ""],
     "prompt 0 is empty"),
    ("generate-long-prompt", ["generate", "--ckpt", "{run}", "--prompt", "ROMEO ROMEO ROMEO ROMEO ROMEO ROMEO ROMEO ROMEO ROMEO ROMEO ROMEO ROMEO ROMEO ROMEO ROMEO ROMEO ROMEO ROMEO ROMEO ROMEO ROMEO ROMEO ROMEO ROMEO ROMEO ROMEO ROMEO ROMEO ROMEO ROMEO ROMEO ROMEO ROMEO ROMEO ROMEO ROMEO ROMEO ROMEO ROMEO ROMEO "],
     "prompt 0 has 161 tokens; the model's context is 32"),
    ("generate-prompts-binary", ["generate", "--ckpt", "{run}", "--prompts-file", "{inp}/prompts.bin"],
     "{inp}/prompts.bin: not UTF-8 text (byte 7: b'\\xff')"),
    ("generate-prompts-missing", ["generate", "--ckpt", "{run}", "--prompts-file", "{inp}/nowhere.txt"],
     "{inp}/nowhere.txt: cannot read the prompts (No such file or"),
    ("generate-prompts-empty", ["generate", "--ckpt", "{run}", "--prompts-file", "{inp}/empty.txt"],
     "{inp}/empty.txt: no prompt in it (one per line)"),
    ("generate-no-prompt", ["generate", "--ckpt", "{run}"],
     "cascade generate: one of the arguments --prompt --prompts-file"),
    ("generate-tau", ["generate", "--ckpt", "{run}", "--prompt", "ROMEO:", "--tau", "-1"],
     "tau must be > 0 (above 1: one position per step), got -1.0"),
    ("generate-remask", ["generate", "--ckpt", "{run}", "--prompt", "ROMEO:", "--policy", "threshold", "--remask", "0.3"],
     "remasking needs a step budget per block: use it with policy"),
    ("generate-tweedie-remask", ["generate", "--ckpt", "{run}", "--prompt", "ROMEO:", "--policy", "tweedie", "--remask", "0.3"],
     "remasking needs a step budget per block: use it with policy fixed, adaptive or entropy, not 'tweedie'"),
    ("generate-order", ["generate", "--ckpt", "{run}", "--prompt", "ROMEO:", "--order", "random"],
     "order 'random' decides a fixed count per step: it goes with"),
    ("generate-max-new", ["generate", "--ckpt", "{run}", "--prompt", "ROMEO:", "--max-new-tokens", "0"],
     "--max-new-tokens must be >= 1, got 0"),
    ("generate-steps", ["generate", "--ckpt", "{run}", "--prompt", "ROMEO:", "--steps", "0"],
     "steps must be >= 1, got 0"),
    ("generate-temperature", ["generate", "--ckpt", "{run}", "--prompt", "ROMEO:", "--sample", "--temperature", "-1"],
     "temperature must be > 0, got -1.0 (use greedy)"),
    ("generate-top-p", ["generate", "--ckpt", "{run}", "--prompt", "ROMEO:", "--sample", "--top-p", "1.5"],
     "top_p must be in (0, 1], got 1.5"),
    ("generate-top-k", ["generate", "--ckpt", "{run}", "--prompt", "ROMEO:", "--sample", "--top-k", "-2"],
     "top_k must be >= 0, got -2"),
    ("generate-policy", ["generate", "--ckpt", "{run}", "--prompt", "ROMEO:", "--policy", "fastest"],
     "cascade generate: argument --policy: invalid choice: 'fastest'"),
    ("generate-threads", ["generate", "--ckpt", "{run}", "--prompt", "ROMEO:", "--threads", "-1"],
     "--threads must be >= 0 (0: torch's default), got -1"),
    ("generate-bound", ["generate", "--ckpt", "{run}", "--prompt", "ROMEO:", "--policy", "entropy", "--bound", "-1"],
     "the entropy bound must be > 0, got -1.0"),
    ("generate-decode-block", ["generate", "--ckpt", "{run}", "--prompt", "ROMEO:", "--decode-block", "0"],
     "--decode-block applies to full-diffusion checkpoints"),
    ("generate-ckpt-is-file", ["generate", "--ckpt", "{inp}/tok.txt", "--prompt", "ROMEO:"],
     "{inp}/tok.txt is neither a run directory nor a complete"),
    # convert
    ("convert-pipeline", ["convert", "mcore-to-mcore", "{run}", "{tmp}/out", "--pipeline", "-1"],
     "--pipeline must be >= 1, got -1"),
    ("convert-pipeline-layers", ["convert", "mcore-to-mcore", "{run}", "{tmp}/out", "--pipeline", "2"],
     "'parallel.pipeline' = 2 does not divide 'model.num_layers' = 1"),
    ("convert-seq-len", ["convert", "hf-to-mcore", "{inp}/hf_llama", "{tmp}/out", "--seq-len", "0"],
     "--seq-len must be >= 1, got 0"),
    ("convert-source-not-run", ["convert", "mcore-to-hf", "{inp}/hf_llama", "{tmp}/out"],
     "{inp}/hf_llama is neither a run directory nor a complete"),
    ("convert-config-json", ["convert", "hf-to-mcore", "{inp}/hf_badjson", "{tmp}/out"],
     "{inp}/hf_badjson/config.json: not a JSON file (Expecting value:"),
    ("convert-safetensors", ["convert", "hf-to-mcore", "{inp}/hf_badweights", "{tmp}/out"],
     "{inp}/hf_badweights/model.safetensors: not a safetensors file"),
    ("convert-gguf", ["convert", "gguf-to-hf", "{inp}/bad.gguf", "{tmp}/out"],
     "{inp}/bad.gguf: not a GGUF file (it does not start with 'GGUF')"),
    ("convert-gguf-missing", ["convert", "gguf-to-hf", "{inp}/nowhere.gguf", "{tmp}/out"],
     "{inp}/nowhere.gguf: no such GGUF file"),
    ("convert-hf-missing", ["convert", "hf-to-mcore", "{inp}/nowhere", "{tmp}/out"],
     "{inp}/nowhere: no config.json (not a Hugging Face model"),
    ("convert-hf-no-config", ["convert", "hf-to-mcore", "{inp}/hf_noconfig", "{tmp}/out"],
     "{inp}/hf_noconfig: no config.json (not a Hugging Face model"),
    ("convert-out-exists", ["convert", "mcore-to-hf", "{run}", "{inp}"],
     "{inp} exists: remove it or choose another output directory"),
    ("convert-damaged", ["convert", "mcore-to-hf", "{inp}/damaged", "{tmp}/out"],
     "{inp}/damaged/checkpoints/iter_0000001 is damaged: __0_0.distcp"),
    ("convert-no-checkpoint", ["convert", "mcore-to-hf", "{inp}/norun", "{tmp}/out"],
     "{inp}/norun: the run has no complete checkpoint yet"),
    ("convert-tensor", ["convert", "mcore-to-mcore", "{run}", "{tmp}/out", "--tensor", "0"],
     "--tensor must be >= 1, got 0"),
    ("convert-tensor-heads", ["convert", "mcore-to-mcore", "{run}", "{tmp}/out", "--tensor", "3"],
     "{run}: the embedding has 8192 rows, which --tensor 3 does not"),
    ("convert-block-size", ["convert", "hf-to-mcore", "{inp}/hf_llama", "{tmp}/out", "--objective", "block_diffusion", "--block-size", "7"],
     "'diffusion.block_size' = 7 does not divide 'data.seq_len' = 128"),
    ("convert-shard-gb", ["convert", "mcore-to-hf", "{run}", "{tmp}/out", "--max-shard-gb", "0"],
     "--max-shard-gb must be > 0, got 0.0"),
    ("convert-direction", ["convert", "hf-to-gguf", "{run}", "{tmp}/out"],
     "cascade convert: argument direction: invalid choice:"),
    # eval
    ("eval-steps", ["eval", "{run}", "--tasks", "shakespeare_cloze", "--steps", "0"],
     "--steps must be >= 1, got 0"),
    ("eval-tau", ["eval", "{run}", "--tasks", "shakespeare_cloze", "--tau", "0"],
     "tau must be > 0 (above 1: one position per step), got 0.0"),
    ("eval-unknown-task", ["eval", "{run}", "--tasks", "no_such_task"],
     "unknown task 'no_such_task': the local tasks are"),
    ("eval-run-missing", ["eval", "{inp}/nowhere", "--tasks", "shakespeare_cloze"],
     "{inp}/nowhere: no such run directory or checkpoint"),
    ("eval-damaged", ["eval", "{inp}/damaged", "--tasks", "shakespeare_cloze"],
     "{inp}/damaged/checkpoints/iter_0000001 is damaged: __0_0.distcp"),
    ("eval-no-checkpoint", ["eval", "{inp}/norun", "--tasks", "shakespeare_cloze"],
     "{inp}/norun: the run has no complete checkpoint yet"),
    ("eval-tasks-empty", ["eval", "{run}", "--tasks", ""],
     "--tasks names no task"),
    ("eval-limit", ["eval", "{run}", "--tasks", "shakespeare_cloze", "--limit", "0"],
     "--limit must be >= 1, got 0"),
    ("eval-mc-samples", ["eval", "{run}", "--tasks", "shakespeare_cloze", "--mc-samples", "0"],
     "--mc-samples must be >= 1, got 0"),
    ("eval-batch", ["eval", "{run}", "--tasks", "shakespeare_cloze", "--batch", "0"],
     "--batch must be >= 1, got 0"),
    ("eval-include-missing", ["eval", "{run}", "--tasks", "shakespeare_cloze", "--include-path", "{inp}/nowhere"],
     "--include-path {inp}/nowhere: no such folder"),
    ("eval-task-data-missing", ["eval", "{run}", "--tasks", "broken_task", "--include-path", "{inp}/tasks"],
     "task broken_task ({inp}/tasks/broken_task.yaml): its data file"),
    # preprocess
    ("preprocess-tokenizer-text", ["preprocess", "{inp}/in.txt", "--output-prefix", "{tmp}/out/ds", "--tokenizer", "{inp}/tok.txt"],
     "{inp}/tok.txt: not a tokenizer file (a tokenizer.json of the"),
    ("preprocess-empty", ["preprocess", "{inp}/empty.txt", "--output-prefix", "{tmp}/out/ds", "--train-bpe", "300"],
     "{inp}/empty.txt: the input is empty"),
    ("preprocess-bpe-zero", ["preprocess", "{inp}/in.txt", "--output-prefix", "{tmp}/out", "--train-bpe", "0"],
     "--train-bpe takes the vocabulary size to train, at least 258"),
    ("preprocess-input-missing", ["preprocess", "{inp}/nowhere.txt", "--output-prefix", "{tmp}/out", "--train-bpe", "300"],
     "input file not found: {inp}/nowhere.txt"),
    ("preprocess-no-tokenizer", ["preprocess", "{inp}/in.txt", "--output-prefix", "{tmp}/out"],
     "cascade preprocess: one of the arguments --tokenizer"),
    ("preprocess-tokenizer-missing", ["preprocess", "{inp}/in.txt", "--output-prefix", "{tmp}/out", "--tokenizer", "{inp}/nowhere.json"],
     "tokenizer not found: {inp}/nowhere.json"),
    ("preprocess-not-utf8", ["preprocess", "{inp}/random.txt", "--output-prefix", "{tmp}/out/ds", "--train-bpe", "300"],
     "{inp}/random.txt: not UTF-8 text (8192 of its first 8192 bytes are not UTF-8); --allow-not-utf8"),
    ("preprocess-workers", ["preprocess", "{inp}/in.txt", "--output-prefix", "{tmp}/out", "--train-bpe", "300", "--workers", "0"],
     "--workers must be >= 1, got 0"),
    ("preprocess-shard-tokens", ["preprocess", "{inp}/in.txt", "--output-prefix", "{tmp}/out", "--train-bpe", "300", "--shard-tokens", "-5"],
     "--shard-tokens must be >= 0 (0: one output file), got -5"),
    ("preprocess-json-key", ["preprocess", "{inp}/docs.jsonl", "--output-prefix", "{tmp}/out", "--train-bpe", "300", "--json-key", "body"],
     "{inp}/docs.jsonl:1: no field 'body' (--json-key)"),
    ("preprocess-bad-jsonl", ["preprocess", "{inp}/bad.jsonl", "--output-prefix", "{tmp}/out", "--train-bpe", "300"],
     "{inp}/bad.jsonl:2: not JSON (Expecting value)"),
    ("preprocess-input-is-dir", ["preprocess", "{inp}/tasks", "--output-prefix", "{tmp}/out", "--train-bpe", "300"],
     "input file not found: {inp}/tasks"),
    ("preprocess-bpe-tiny", ["preprocess", "{inp}/in.txt", "--output-prefix", "{tmp}/out", "--train-bpe", "5"],
     "--train-bpe takes the vocabulary size to train, at least 258"),
    # plan
    ("plan-gpus-zero", ["plan", S, "--gpus", "0"],
     "--gpus must be >= 1, got 0"),
    ("plan-gpus-negative", ["plan", S, "--gpus", "-8"],
     "--gpus must be >= 1, got -8"),
    ("plan-config-missing", ["plan", "{inp}/nowhere.yaml", "--gpus", "8"],
     "config file not found: {inp}/nowhere.yaml"),
    ("plan-unknown-key", ["plan", S, "--gpus", "8", "model.num_layrs=3"],
     "override 'model.num_layrs=3': unknown config key"),
    ("plan-layout", ["plan", S, "--gpus", "8", "parallel.tensor=3"],
     "'parallel.tensor' = 3 does not divide 'model.num_attention_heads"),
    ("plan-gpu-memory", ["plan", S, "--gpus", "1", "--gpu-memory", "0"],
     "--gpu-memory must be > 0 (GiB), got 0.0"),
    # submit
    ("submit-no-sbatch", ["submit", S, "--cluster", "{profile}", "run_dir={tmp}/run"],
     "sbatch is not on PATH: is this a Slurm login node? (--dry-run", {"PATH": "{tmp}/no-slurm-here"}),
    ("submit-nodes", ["submit", S, "--cluster", "{profile}", "--nodes", "0", "--dry-run", "run_dir={tmp}/run"],
     "--nodes must be >= 1, got 0"),
    ("submit-gpus-per-node", ["submit", S, "--cluster", "{profile}", "--nodes", "1", "--gpus-per-node", "0", "--dry-run", "run_dir={tmp}/run"],
     "--gpus-per-node must be >= 1, got 0"),
    ("submit-cluster-missing", ["submit", S, "--cluster", "nowhere", "--dry-run", "run_dir={tmp}/run"],
     "unknown cluster profile 'nowhere': expected one of h100, local"),
    ("submit-no-config", ["submit", "--cluster", "{profile}", "--dry-run"],
     "give a run config (YAML), or --chain FILE"),
    ("submit-unknown-key", ["submit", S, "--cluster", "{profile}", "--dry-run", "model.num_layrs=3", "run_dir={tmp}/run"],
     "override 'model.num_layrs=3': unknown config key"),
    ("submit-time", ["submit", S, "--cluster", "{profile}", "--dry-run", "--time", "forever", "run_dir={tmp}/run"],
     "time limit 'forever': expected [D-]HH:MM:SS, MM:SS or minutes"),
    ("submit-max-restarts", ["submit", S, "--cluster", "{profile}", "--dry-run", "--nodes", "1", "--gpus-per-node", "1", "--max-restarts", "-1", "run_dir={tmp}/run"],
     "--max-restarts must be >= 0, got -1"),
    ("submit-chain-missing", ["submit", "--cluster", "{profile}", "--dry-run", "--chain", "{inp}/nowhere.yaml"],
     "chain file not found: {inp}/nowhere.yaml"),
    ("submit-profile-bad", ["submit", S, "--cluster", "{inp}/badprofile.yaml", "--dry-run", "run_dir={tmp}/run"],
     "cluster profile {inp}/badprofile.yaml: bad key 'nodes': Value"),
    ("submit-array-parallel", ["submit", S, "--cluster", "{profile}", "--dry-run", "--array-parallel", "0", "run_dir={tmp}/run"],
     "--array-parallel must be >= 1, got 0"),
    ("submit-partition", ["submit", S, "--cluster", "{profile}", "--dry-run", "--partition", "nowhere", "run_dir={tmp}/run"],
     "partition 'nowhere' is not one of profile 'h100''s: batch,"),
    ("submit-gpus-over", ["submit", S, "--cluster", "{profile}", "--dry-run", "--gpus-per-node", "64", "run_dir={tmp}/run"],
     "64 GPUs per node: profile 'h100' nodes have 8"),
    # sweep
    ("sweep-missing", ["sweep", "{inp}/nowhere.yaml", "--dry-run"],
     "sweep file not found: {inp}/nowhere.yaml"),
    ("sweep-unknown-key", ["sweep", "{inp}/sweep_badkey.yaml", "--dry-run"],
     "{inp}/sweep_badkey.yaml: unknown sweep key 'grid_typo' (keys:"),
    ("sweep-empty-axis", ["sweep", "{inp}/sweep_empty_axis.yaml", "--dry-run"],
     "{inp}/sweep_empty_axis.yaml: grid 1: axis 'tokens' has no"),
    ("sweep-unknown-axis", ["sweep", "{inp}/sweep_unknown_axis.yaml", "--dry-run"],
     "{inp}/sweep_unknown_axis.yaml: grid 1: unknown axis 'blok_size'"),
    ("sweep-fit-no-runs", ["sweep", "fit", "configs/sweeps/cpu_demo.yaml", "--root", "{tmp}/sweep"],
     "sweep cpu_demo: no finished run with a final validation loss in"),
    ("sweep-bootstrap", ["sweep", "fit", "configs/sweeps/cpu_demo.yaml", "--root", "{tmp}/sweep", "--bootstrap", "-1"],
     "--bootstrap must be >= 0 (0: no bands), got -1"),
    ("sweep-no-file", ["sweep"],
     "cascade sweep: the following arguments are required: [fit]"),
    ("sweep-slurm-no-cluster", ["sweep", "{inp}/sweep_nocluster.yaml", "--executor", "slurm", "--dry-run"],
     "{inp}/sweep_nocluster.yaml: --executor slurm needs a cluster"),
    # runs
    ("runs-no-store", ["runs", "--root", "{tmp}/nowhere"],
     "no tracking store: no run directory with mlflow.db under"),
    ("runs-bad-uri", ["runs", "--tracking-uri", "htp://x"],
     "'tracking.uri' = 'htp://x' is not a tracking store: expected"),
    # jobs
    ("jobs-missing", ["jobs", "{inp}/nowhere"],
     "job {inp}/nowhere: not submitted from here"),
    ("jobs-lines", ["jobs", "{run}", "--lines", "-1"],
     "--lines must be >= 0, got -1"),
    # bench
    ("bench-train-unknown-key", ["bench", "train", S, "model.num_layrs=3"],
     "override 'model.num_layrs=3': unknown config key"),
    ("bench-generate-missing", ["bench", "generate", "--bd", "{inp}/nowhere"],
     "{inp}/nowhere: no such run directory or checkpoint"),
    ("bench-train-steps", ["bench", "train", S, "--steps", "0"],
     "--steps must be >= 1, got 0"),
    ("bench-noise-floors", ["bench", "noise", "{run}", "--floors", "2"],
     "--floors '2': give floors in [0, 1), comma-separated"),
    ("bench-noise-missing", ["bench", "noise", "{inp}/nowhere"],
     "{inp}/nowhere: no such run directory or checkpoint"),
    ("bench-noise-clip", ["bench", "noise", "{run}", "--clip", "0.8,0.3"],
     "--clip '0.8,0.3': give T_MIN,T_MAX with 0 <= T_MIN < T_MAX <= 1"),
    ("bench-noise-draws", ["bench", "noise", "{run}", "--draws", "1"],
     "--draws must be >= 2 (a spread needs two), got 1"),
    ("bench-noise-floors-text", ["bench", "noise", "{run}", "--floors", "low,high"],
     "--floors 'low,high': give floors in [0, 1), comma-separated"),
    ("bench-continued-runs", ["bench", "continued", "--root", "{tmp}/smollm2", "--runs", "nope"],
     "--runs 'nope': choose among converted, scratch, causal (distilled needs --distill)"),
    ("bench-continued-override", ["bench", "continued", "--root", "{tmp}/smollm2", "--runs",
                                  "converted", "model.num_layrs=3"],
     "override 'model.num_layrs=3': unknown config key"),
    ("bench-no-target", ["bench"],
     "cascade bench: the following arguments are required: what (see"),
    ("bench-train-config-missing", ["bench", "train", "{inp}/nowhere.yaml"],
     "config file not found: {inp}/nowhere.yaml"),
    ("bench-generate-prompts-missing", ["bench", "generate", "--bd", "{run}", "--ar", "{run}", "--prompts-file", "{inp}/nowhere.txt"],
     "{inp}/nowhere.txt: cannot read the prompts (No such file or"),
    ("bench-generate-batch", ["bench", "generate", "--bd", "{run}", "--ar", "{run}", "--batch", "0"],
     "--batch sizes must be >= 1, got '0'"),
]


def _write(path, body) -> None:
    with open(path, "wb" if isinstance(body, bytes) else "w") as f:
        f.write(body)


def _hf_llama(folder, seed=1) -> None:
    """A whole one-layer Llama (LLAMA's shapes) in safetensors."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen) * 0.02

    layer = "model.layers.0."
    state = {"model.embed_tokens.weight": rand(300, 64), "lm_head.weight": rand(300, 64),
             "model.norm.weight": torch.ones(64), layer + "input_layernorm.weight": torch.ones(64),
             layer + "post_attention_layernorm.weight": torch.ones(64),
             layer + "mlp.gate_proj.weight": rand(128, 64), layer + "mlp.up_proj.weight":
             rand(128, 64), layer + "mlp.down_proj.weight": rand(64, 128)}
    for proj in "qkvo":
        state[f"{layer}self_attn.{proj}_proj.weight"] = rand(64, 64)
    save_file(state, os.path.join(folder, "model.safetensors"))


def build_inputs(inp, run) -> None:
    """The bad files the table names under {inp}, and copies of the tiny run {run} damaged in
    three ways (a shard's bytes changed, another model's config, no checkpoint)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from cascade_mega.data.indexed import write_indexed
    from cascade_mega.data.shakespeare import ensure_dataset
    from cascade_mega.data.tokenizer import CascadeTokenizer

    os.makedirs(inp, exist_ok=True)

    def at(name):
        return os.path.join(inp, name)

    base = os.path.abspath("configs/base.yaml")
    texts = {"badkey.yaml": f"base: {base}\ntrain:\n  stepz: 3\n",
             "syntax.yaml": "model:\n  num_layers: [1, 2\n",
             "section_list.yaml": "model:\n  - 1\n  - 2\n", "top_list.yaml": "- model\n",
             "in.txt": "some text to tokenise\n" * 20, "empty.txt": "",
             "tok.txt": "not a tokenizer\n", "docs.jsonl": '{"text": "a document"}\n',
             "bad.jsonl": '{"text": "a document"}\n{"text": \n',
             "badprofile.yaml": "nodes: [1, 2]\nno_such_key: 3\n",
             "prompts.bin": b"ROMEO:\n\xff\xfeJULIET\n", "bad.gguf": b"GGML" + os.urandom(100),
             "random.txt": bytes(range(128, 256)) * 64}
    sweep = open("configs/sweeps/cpu_demo.yaml").read().replace("base: ../base.yaml",
                                                                 f"base: {base}")
    texts.update({"sweep_badkey.yaml": sweep + "grid_typo: 3\n",
                  "sweep_empty_axis.yaml": sweep.replace("tokens: [4.096e5]\n", "tokens: []\n"),
                  "sweep_unknown_axis.yaml": sweep.replace("block_size: [16]", "blok_size: [16]"),
                  "sweep_nocluster.yaml": sweep.replace("cluster: local\n", "")})
    for name, body in texts.items():
        _write(at(name), body)
    h100_profile(inp)
    # datasets: each wrong in one way
    tok = CascadeTokenizer(os.path.join(os.path.dirname(ensure_dataset()), "tokenizer.json"))
    gen = torch.Generator().manual_seed(0)

    def docs(extra=()):
        return [torch.randint(2, 8000, (300,), generator=gen).tolist() + list(extra)] * 50

    write_indexed(at("beyond"), docs([9000]), tok)
    write_indexed(at("mask"), docs([tok.mask_id]), tok)
    write_indexed(at("good"), docs(), tok)
    write_indexed(at("truncated"), docs(), tok)
    with open(at("truncated") + ".bin", "r+b") as f:
        f.truncate(os.path.getsize(at("truncated") + ".bin") - 10)
    write_indexed(at("one_document"), [list(range(2, 2000))], tok)
    write_indexed(at("mismatch"), docs(), tok)
    write_indexed(at("short"), [list(range(2, 121))] * 50, tok)
    os.replace(at("short") + ".idx", at("mismatch") + ".idx")  # an .idx of another .bin
    write_indexed(at("badidx"), docs(), tok)
    with open(at("badidx") + ".idx", "r+b") as f:
        f.write(b"NOT-AN-INDEX")
    other = Tokenizer(models.BPE())
    other.pre_tokenizer = pre_tokenizers.ByteLevel()
    other.train_from_iterator(["a different corpus " * 50], trainers.BpeTrainer(vocab_size=300))
    other.save(at("other_tok.json"))
    # Hugging Face directories
    for name, config in (("hf_badjson", '{"architectures": '), ("hf_badweights", LLAMA),
                         ("hf_noconfig", None), ("hf_llama", LLAMA)):
        os.makedirs(at(name))
        if config:
            _write(os.path.join(at(name), "config.json"), config)
        shutil.copy(os.path.join(run, "tokenizer.json"), at(name))
        if name == "hf_llama":
            _hf_llama(at(name))
        else:
            _write(os.path.join(at(name), "model.safetensors"), os.urandom(1000))
    # runs: a shard's bytes changed (its manifest says so), another model's config, none saved
    shutil.copytree(run, at("damaged"))
    shard = os.path.join(at("damaged"), "checkpoints", "iter_0000001", "__0_0.distcp")
    data = bytearray(open(shard, "rb").read())
    data[100:164] = os.urandom(64)
    _write(shard, bytes(data))
    shutil.copytree(run, at("other"))
    config = os.path.join(at("other"), "config.yaml")
    _write(config, open(config).read().replace("hidden_size: 64", "hidden_size: 96"))
    os.makedirs(at("norun"))
    shutil.copy(os.path.join(run, "config.yaml"), at("norun"))
    os.makedirs(at("tasks"))
    _write(os.path.join(at("tasks"), "broken_task.yaml"),
           "task: broken_task\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
           "    test: nowhere.jsonl\ntest_split: test\noutput_type: loglikelihood\n"
           "doc_to_text: '{{text}}'\ndoc_to_target: ' x'\nmetric_list:\n  - metric: perplexity\n")
