"""An ordinary inference script (knows nothing of OmniKV): load, score, generate, save ids as JSON.

python infer.py MODEL_DIR OUT_JSON [--new-tokens N] [--exit-code C] [--fail]
"""

import argparse
import json
import sys

import torch
from transformers import AutoModelForCausalLM

parser = argparse.ArgumentParser()
parser.add_argument("model_dir")
parser.add_argument("out_json")
parser.add_argument("--new-tokens", type=int, default=8)
parser.add_argument("--exit-code", type=int, default=0)
parser.add_argument("--fail", action="store_true")
args = parser.parse_args()

model = AutoModelForCausalLM.from_pretrained(args.model_dir).eval()
generator = torch.Generator().manual_seed(1)
ids = torch.randint(3, model.config.vocab_size, (2, 40), generator=generator)
mask = torch.ones_like(ids)
mask[1, :7] = 0
ids[mask == 0] = 0
with torch.no_grad():
    scores = model(ids, attention_mask=mask).logits  # a forward without a cache: scoring
    out = model.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
result = {"argv": sys.argv, "__name__": __name__, "ids": out.tolist(), "logits_sum": scores.double().sum().item()}
with open(args.out_json, "w") as handle:
    json.dump(result, handle)
print(f"generated {out.shape[1] - ids.shape[1]} tokens")
if args.fail:
    raise ValueError("boom from the script")
sys.exit(args.exit_code)
