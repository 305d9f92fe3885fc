"""ReLoRA* with ``transformers.Trainer``: the README's recipe, in one process or under torchrun.

    python examples/train_trainer.py --out runs/trainer
    torchrun --nproc_per_node=2 examples/train_trainer.py --out runs/trainer          # DDP, gloo on CPU
    torchrun --nproc_per_node=2 examples/train_trainer.py --out runs/resumed --resume runs/trainer/checkpoint-4
    torchrun --nproc_per_node=2 examples/train_trainer.py --out runs/peft --peft      # a PEFT model, cycled as it is

Trains a tiny LLaMA (transformers' ``LlamaForCausalLM``) on fixed random token windows, cycling every
``--reset-every`` steps; :class:`relora_ext.ReLoRACallback` prints each cycle on the console like the
Trainer's own log lines. The Trainer saves a checkpoint every ``--save-steps`` (the unmerged training state,
so ``--resume`` continues exactly), ``trainer.save_model`` writes the merged model to ``OUT/final`` at the
end, and every rank writes its final weights to ``OUT/final-rank<k>.pt`` (to compare the ranks).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import relora_ext  # noqa: E402
from relora_ext.hf import install_save_hook  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory (checkpoints, final model)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--reset-every", type=int, default=3)
    p.add_argument("--save-steps", type=int, default=4)
    p.add_argument("--rank", type=int, default=4, help="LoRA rank r")
    p.add_argument("--resume", default=None, help="a checkpoint-N directory to resume from")
    p.add_argument("--peft", action="store_true",
                   help="a PEFT LoRA model cycled as it is (no Trainer checkpoints: PEFT's adapter file would "
                        "lack the merged base weights)")
    args = p.parse_args(argv)

    import transformers

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    targs = transformers.TrainingArguments(
        output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=2, learning_rate=1e-2,
        logging_steps=2, save_strategy="no" if args.peft else "steps", save_steps=args.save_steps, report_to=[],
        use_cpu=True,
        ddp_backend="gloo" if distributed else None, seed=0, disable_tqdm=True)   # sets up torch.distributed

    torch.manual_seed(0)   # the same model on every rank
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=4, vocab_size=64, max_position_embeddings=64)
    if args.peft:
        import peft

        model = peft.get_peft_model(transformers.LlamaForCausalLM(cfg),
                                    peft.LoraConfig(r=args.rank, target_modules="all-linear"))
    else:
        model = relora_ext.wrap(transformers.LlamaForCausalLM(cfg), r=args.rank)
        install_save_hook(model)   # model.save_pretrained writes the merged model
    opt = relora_ext.ReLoRAOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model,
                                     reset_every=args.reset_every, seed=0)
    sched = relora_ext.JaggedCosineLR(opt, total_steps=args.steps, warmup_steps=1, restart_warmup_steps=1)
    ids = torch.randint(0, 64, (64, 16), generator=torch.Generator().manual_seed(1))
    data = [{"input_ids": row, "labels": row} for row in ids]
    trainer = transformers.Trainer(model=model, args=targs, train_dataset=data, optimizers=(opt, sched),
                                   callbacks=[relora_ext.ReLoRACallback(opt)])
    trainer.train(resume_from_checkpoint=args.resume)
    rank = int(os.environ.get("RANK", "0"))
    torch.save({"model": model.state_dict(), "cycles_done": opt.cycles_done},
               os.path.join(args.out, f"final-rank{rank}.pt"))
    if args.peft:   # the whole model: the cycles merged the update into the base weights
        if trainer.is_world_process_zero():
            model.merge_and_unload().save_pretrained(os.path.join(args.out, "final"))
    else:
        trainer.save_model(os.path.join(args.out, "final"))


if __name__ == "__main__":
    main()
