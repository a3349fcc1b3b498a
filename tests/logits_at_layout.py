"""Logits of a fixed batch from a checkpoint, at whatever layout torchrun gives (a test helper).

usage: python -m torch.distributed.run --nproc-per-node N tests/logits_at_layout.py OUT CONFIG
       [overrides, including train.resume=<checkpoint> and parallel.*]

Every rank loads the checkpoint through the trainer's own set-up (so it is resharded to this
layout), runs the validation micro-batches forward, and the full-vocabulary logits of every
read-out row are put back in whole-sequence order: OUT holds a [micro-batches, b, rows, vocab]
float64 tensor, written by one rank; OUT.ids the input ids of those micro-batches (whole
sequences except under context parallel).
"""

import sys

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from cascade_mega.config import load_config
from cascade_mega.model.gpt import read_out_logits
from cascade_mega.train.trainer import Trainer


def _logits(*, hidden_states, output_layer, output_weight, context, **_unused):
    return read_out_logits(hidden_states, output_layer, output_weight, context.rows, True)


def _forward_step(data_iterator, model):
    prep = next(data_iterator)
    logits = model(prep.input_ids, prep.position_ids, prep.layout, output_processor=_logits,
                   output_processor_context=prep.readout)
    held = prep.layout.rows()
    rows = held if prep.readout.rows is None else held[prep.readout.rows]

    def report(out):
        return out.sum() * 0.0, torch.tensor(1, dtype=torch.int), {
            "logits": out.detach().double().transpose(0, 1), "rows": rows,
            "ids": prep.input_ids}

    return logits, report


def main(out_path, config, *overrides):
    trainer = Trainer(load_config(config, list(overrides))).setup()
    for c in trainer.chunks:
        c.eval()
    cfg = trainer.cfg
    batch = trainer.objective.batch(trainer.valid_data, 0, "valid")
    make = batch.make

    with torch.no_grad():
        outs = get_forward_backward_func()(
            forward_step_func=_forward_step,
            data_iterator=make() if len(trainer.chunks) == 1 else [make() for _ in trainer.chunks],
            model=trainer.chunks if len(trainer.chunks) > 1 else trainer.chunks[0],
            num_microbatches=trainer.num_micro, seq_length=batch.rows,
            micro_batch_size=cfg.train.micro_batch_size, forward_only=True)
    last = ps.is_pipeline_last_stage(ignore_virtual=True)
    if last and ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
        parts = [(o["logits"], o["rows"]) for o in outs]
        gathered = [None] * ps.get_context_parallel_world_size()
        dist.all_gather_object(gathered, parts, group=ps.get_context_parallel_group())
        if ps.get_context_parallel_rank() == 0:
            batches = []
            for m in range(len(parts)):
                logits = torch.cat([g[m][0] for g in gathered], dim=1)
                rows = torch.cat([g[m][1] for g in gathered])
                batches.append(logits[:, rows.argsort()])
            torch.save(torch.stack(batches), out_path)
            torch.save(torch.stack([o["ids"] for o in outs]), out_path + ".ids")
    dist.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:])
