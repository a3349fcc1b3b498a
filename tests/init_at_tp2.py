"""Run by tests/test_device.py under torchrun (2 ranks): a TP = 2 model built on the stand-in
device, its weights written as a checkpoint that one process can load at TP = 1."""

import sys

import torch

from helpers import MASK_ID, VOCAB, tiny_cfg
from standin_device import Dev, standin

from cascade_mega.model.gpt import build_model
from cascade_mega.runtime import distributed
from cascade_mega import checkpoint

root = sys.argv[1]
cfg = tiny_cfg("parallel.tensor=2", "model.num_query_groups=2", "model.qk_norm=true",
               "model.time_conditioning=true", f"run_dir={root}")
distributed.init(cfg.parallel, seed=1234)
with standin():
    torch.manual_seed(0)
    on_device = build_model(cfg, VOCAB, forbidden_ids=[MASK_ID])
    weights = {k: v.elem.clone() for k, v in on_device.state_dict().items()
               if isinstance(v, Dev)}
host = build_model(cfg, VOCAB, forbidden_ids=[MASK_ID])  # a host model carries them to disk
missing = host.load_state_dict(weights, strict=False).missing_keys
assert all(k.endswith("_extra_state") for k in missing), missing
checkpoint.save(root, [host], None, None, 0, 0)
