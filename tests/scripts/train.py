"""An ordinary tiny training loop (knows nothing of OmniKV): a few AdamW steps on random tokens.

    python train.py MODEL_DIR OUT_SAFETENSORS [--steps N]

Saves the losses and the gradients of the last step (safetensors) so that runs can be compared.
"""

import argparse

import torch
from safetensors.torch import save_file
from transformers import LlamaForCausalLM

parser = argparse.ArgumentParser()
parser.add_argument("model_dir")
parser.add_argument("out")
parser.add_argument("--steps", type=int, default=3)
args = parser.parse_args()

torch.manual_seed(0)
model = LlamaForCausalLM.from_pretrained(args.model_dir)
model.train()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
losses = []
for _ in range(args.steps):
    batch = torch.randint(3, model.config.vocab_size, (2, 24))
    loss = model(input_ids=batch, labels=batch).loss
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    losses.append(loss.detach())
tensors = {f"grad.{name}": param.grad.contiguous() for name, param in model.named_parameters()}
tensors["losses"] = torch.stack(losses)
save_file(tensors, args.out)
print("final loss", losses[-1].item())
