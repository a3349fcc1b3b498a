"""An exported model in `transformers` alone (a test helper, run in a fresh interpreter).

usage: python tests/hf_remote.py DIR REQUEST OUT [DIR REQUEST OUT ...]

cascade_mega is made unimportable first (an import of it raises), so the directory's own modeling
code is all that runs. REQUEST (torch.save) holds `x_t`, `x_0` [b, L] (the training layout whose
logits to return; x_t alone for a full-diffusion model), `prompts` (token lists) and `runs` (the
`generate` keyword arguments of each decoding). OUT gets `logits` [b, L, V] of the x_t rows and
`tokens`: per run, per prompt, the new tokens up to end-of-text (excluded); an export with a
causal clean stream also `plain`: per prompt, `transformers`' own greedy `GenerationMixin.generate`
of the model as an ordinary causal LM (its forward without a mask is the clean stream). A plain
(AR) export
loads without remote code: its logits are causal ones of x_t, its runs `transformers`' own greedy
`generate`.
"""

import importlib.abc
import sys


class _Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "cascade_mega" or name.startswith("cascade_mega."):
            raise ImportError(f"{name} must not be imported by an exported model")
        return None


def one(folder, request_path, out_path):
    import json
    import os

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    request = torch.load(request_path)
    remote = "auto_map" in json.load(open(os.path.join(folder, "config.json")))
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=remote,
                                                 dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=remote)
    eos = model.config.eos_token_id
    with torch.no_grad():
        if remote:
            inputs = model.block_diffusion_inputs(request["x_t"], request.get("x_0"))
            logits = model(**inputs).logits[:, :request["x_t"].shape[1]]
        else:
            logits = model(request["x_t"]).logits
    prompts = request["prompts"]
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), eos)
    attention = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding, as the tokenizer pads for generation
        ids[i, width - len(p):], attention[i, width - len(p):] = torch.tensor(p), 1
    tokens = []
    for kwargs in request["runs"]:
        if not remote:  # transformers' own decoding of the plain architecture
            kwargs = {"max_new_tokens": kwargs["max_new_tokens"], "do_sample": False}
        out = model.generate(input_ids=ids, attention_mask=attention, **kwargs)[:, width:]
        rows = [r.tolist() for r in out]
        tokens.append([r[:r.index(eos)] if eos in r else r for r in rows])
    plain = []
    if getattr(model.config, "clean_stream", "") == "causal":
        from transformers import GenerationMixin

        new = request["runs"][0]["max_new_tokens"]
        for p in prompts:
            out = GenerationMixin.generate(model, torch.tensor([p]), max_new_tokens=new,
                                           do_sample=False, use_cache=False)[0, len(p):].tolist()
            plain.append(out[:out.index(eos)] if eos in out else out)
    torch.save({"logits": logits, "tokens": tokens, "plain": plain, "mask_token": tok.mask_token,
                "mask_id": tok.mask_token_id, "eos": tok.eos_token_id,
                "config_eos": model.config.eos_token_id}, out_path)


if __name__ == "__main__":
    sys.meta_path.insert(0, _Refuse())
    for i in range(1, len(sys.argv), 3):
        one(*sys.argv[i:i + 3])
