"""hhrm: HH-RLHF reward model and RAFT recipes on TRL."""

import logging

# bitsandbytes (imported by peft, through trl) warns on every start on an AVX512-BF16 CPU that the optional `kernels`
# package is missing; installing it would download a kernel from the Hub at import. The 4-bit CPU path works without.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
