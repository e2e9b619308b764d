"""A script that configures its own logging and loads two models: one the runtime takes, one it cannot.

python two_models.py BIG_MODEL_DIR SMALL_MODEL_DIR [--exit-code C]
"""

import argparse
import logging
import sys

import torch
from transformers import AutoModelForCausalLM, GenerationConfig

parser = argparse.ArgumentParser()
parser.add_argument("big")
parser.add_argument("small")
parser.add_argument("--exit-code", type=int, default=0)
args = parser.parse_args()

logging.basicConfig(level=logging.INFO, format="SCRIPT|%(name)s|%(message)s")
log = logging.getLogger("two_models")
log.info("logging configured by the script")

big = AutoModelForCausalLM.from_pretrained(args.big).eval()
small = AutoModelForCausalLM.from_pretrained(args.small).eval()
ids = torch.randint(3, big.config.vocab_size, (1, 30), generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    beams = big.generate(ids, generation_config=GenerationConfig(max_new_tokens=3, num_beams=2, pad_token_id=0))
    greedy = big.generate(ids, generation_config=GenerationConfig(max_new_tokens=3, do_sample=False, pad_token_id=0))
    plain = small.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
log.info("shapes %s %s %s", tuple(beams.shape), tuple(greedy.shape), tuple(plain.shape))
sys.exit(args.exit_code)
