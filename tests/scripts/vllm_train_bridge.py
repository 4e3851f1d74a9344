"""Run `examples/train_bridge.py` unchanged with a colocated vLLM engine, for `tests/test_vllm_recipe.py`:

    accelerate launch --cpu tests/scripts/vllm_train_bridge.py --config RECIPE --use_vllm true ...

Before the example runs, this process installs the test-side CPU sync workaround and the float32 engine
(`tests/vllm_cpu.py`; a GPU run would need neither). Two additions, both observation only: every engine sync is
recorded (step, and the engine's prompt log-probs of `PROBE`), and after `BridgeTrainer.save_model` the engine is
synced once more and its prompt log-probs of `PROBE` are written, with the sync records and the trainer's log
history, to `vllm_probe.pt` in the output folder, so the test can compare them with the saved `merged/` policy.
"""

import os
import runpy
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))  # `tests.vllm_cpu`

from tests.vllm_cpu import SyncRecorder, setup_process, vllm_prompt_logprobs  # noqa: E402

setup_process()

import torch  # noqa: E402

from bridge_trl import BridgeTrainer  # noqa: E402

PROBE = "<|im_start|>user\nWhat is 7 times 8?<|im_end|>\n<|im_start|>assistant\n7 times 8 is 56."
EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "train_bridge.py")

_init, _save_model = BridgeTrainer.__init__, BridgeTrainer.save_model


def init(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    assert self.use_vllm and self.vllm_mode == "colocate"
    ids = self.processing_class(PROBE, add_special_tokens=False)["input_ids"]
    self._vllm_probe = (ids, SyncRecorder(self, [ids]))


def save_model(self, output_dir=None, _internal_call=False):
    _save_model(self, output_dir, _internal_call)
    if _internal_call:
        return
    ids, recorder = self._vllm_probe
    syncs = list(recorder.records)
    self.vllm_generation.sync_weights()  # collective under ZeRO-3: every rank
    final = vllm_prompt_logprobs(self.vllm_generation.llm, [ids])[0]
    if self.accelerator.is_main_process:
        torch.save({"input_ids": ids, "final": final, "syncs": syncs, "log_history": self.state.log_history},
                   os.path.join(output_dir or self.args.output_dir, "vllm_probe.pt"))  # fmt: skip


BridgeTrainer.__init__, BridgeTrainer.save_model = init, save_model
sys.argv = [EXAMPLE, *sys.argv[1:]]
runpy.run_path(EXAMPLE, run_name="__main__")
