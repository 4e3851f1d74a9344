"""Run `examples/train_bridge.py` unchanged, and record the trained policy's logits on a fixed input.

`tests/test_real.py` launches this with `accelerate launch` instead of the example itself, so that it can compare
the reloaded checkpoints with the model as it was at the end of training: the one addition is that
`BridgeTrainer.save_model` also writes `probe_logits.pt` (logits of π(θ, w) on `PROBE_TEXT`) into the output
folder before saving.
"""

import os
import runpy
import sys

import torch

from bridge_trl import BridgeTrainer

PROBE_TEXT = "<|im_start|>user\nWhat is 7 times 8?<|im_end|>\n<|im_start|>assistant\n7 times 8 is"
EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "train_bridge.py")

_save_model = BridgeTrainer.save_model


def save_model(self, output_dir=None, _internal_call=False):
    _save_model(self, output_dir, _internal_call)
    if _internal_call or not self.accelerator.is_main_process:
        return
    model = self.accelerator.unwrap_model(self.model)
    ids = self.processing_class(PROBE_TEXT, add_special_tokens=False, return_tensors="pt")["input_ids"]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids.to(model.device)).logits.float().cpu()
    model.train(was_training)
    torch.save(
        {"input_ids": ids, "logits": logits}, os.path.join(output_dir or self.args.output_dir, "probe.pt")
    )


BridgeTrainer.save_model = save_model
sys.argv = [EXAMPLE, *sys.argv[1:]]
runpy.run_path(EXAMPLE, run_name="__main__")
